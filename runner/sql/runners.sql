-- name: insert_runner
-- Create a runner with the hash of its token; returns its id.
INSERT INTO runners (name, token_hash) VALUES ($1, $2) RETURNING id;
