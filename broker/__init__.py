"""The broker service: WebSocket ingest into the Postgres outbox, and the relay."""
