"""alembic environment and revisions of the runledger schema."""
