"""``python -m runledger`` is the ``runledger`` command."""

from runledger.cli import main

main()
