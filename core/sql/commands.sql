-- name: insert_command
-- Store a queued command for a runner; returns its id.
INSERT INTO commands (runner_id, argv, cwd, env)
VALUES ($1, $2::jsonb, $3, $4::jsonb)
RETURNING id;

-- name: insert_delivery_state
-- Give a new command its row of relay state, so the relay can claim it.
INSERT INTO command_delivery (command_id) VALUES ($1);

-- name: request_cancel
-- Mark a command for cancelling unless it already finished; returns its runner.
UPDATE commands
SET cancel_requested_at = coalesce(cancel_requested_at, now())
WHERE id = $1
  AND status NOT IN ('succeeded', 'failed', 'cancelled', 'lost')
RETURNING runner_id;

-- name: find_runner_by_name
-- A runner's id by its name, if it exists and is not revoked.
SELECT id FROM runners WHERE name = $1 AND revoked_at IS NULL;
