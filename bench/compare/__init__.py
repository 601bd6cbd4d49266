"""Side-by-side benchmarks: runledger against the limit and the alternatives.

``python -m bench.compare`` runs every scenario on the same workload (events
of 200 bytes of output spread over 100 commands), prints one table, writes
the figures as JSON under ``bench/results/`` and draws
``docs/performance.png``.
"""
