-- name: claim_queued_commands
-- Mark a runner's undispatched commands as dispatched, if its connection is current.
UPDATE commands AS c
SET dispatched_at = now(),
    status = CASE WHEN c.status = 'queued' THEN 'dispatched' ELSE c.status END
FROM runners AS r
WHERE c.runner_id = $1
  AND c.dispatched_at IS NULL
  AND r.id = c.runner_id
  AND r.connection_epoch = $2
RETURNING c.id, c.argv, c.cwd, c.env, c.created_at;

-- name: dispatched_commands_without_events
-- Commands sent on an earlier connection that never produced an event.
SELECT c.id, c.argv, c.cwd, c.env, c.created_at
FROM commands AS c
WHERE c.runner_id = $1
  AND c.dispatched_at IS NOT NULL
  AND c.status = 'dispatched'
  AND NOT EXISTS (SELECT 1 FROM events AS e WHERE e.command_id = c.id)
ORDER BY c.created_at;

-- name: commands_to_cancel
-- A runner's dispatched, unfinished commands that someone asked to cancel.
SELECT c.id
FROM commands AS c
WHERE c.runner_id = $1
  AND c.cancel_requested_at IS NOT NULL
  AND c.dispatched_at IS NOT NULL
  AND c.status NOT IN ('succeeded', 'failed', 'cancelled', 'lost')
  AND NOT EXISTS (
      SELECT 1 FROM events AS e WHERE e.command_id = c.id AND e.kind = 'exit'
  )
ORDER BY c.cancel_requested_at;
