"""The fault soak: runledger under sustained faults must lose nothing.

``python -m bench.soak`` starts its own embedded Postgres, a broker, a relay
and the web tier as ``runledger`` processes, and many ``runledger runner``
processes whose children write known output. While they run it injects
faults at random moments (SIGKILL of a broker, a relay or a runner, a
Postgres restart, connection drops and stalls through its own TCP proxy, a
sink that fails, times out or answers 429), then checks with ``runledger
audit`` and with SQL that every log is complete, in order and byte-exact.
"""
