"""Contracts and plumbing shared by every runledger service.

Nothing here imports the services: the runner, the broker, the relay and the
web tier all build on these modules, never the other way round.
"""
