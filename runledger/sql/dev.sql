-- name: upsert_runner_token
-- Create the local runner, or give it a fresh token; returns its id.
INSERT INTO runners (name, token_hash) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash, revoked_at = NULL
RETURNING id;

-- name: exit_payload
-- The payload of a command's final event, once it is stored.
SELECT payload FROM events
WHERE command_id = $1 AND kind = 'exit'
ORDER BY sequence DESC
LIMIT 1;
