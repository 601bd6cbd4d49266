"""The Litestar web tier: read API, pages, and the relay's ingest endpoint."""
