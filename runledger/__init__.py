"""The runledger command line: composes the runner, broker, relay and web tier."""
