-- name: events_after
-- Stored events of a command after a sequence, in sequence order, at most $3.
SELECT sequence, id, kind, stream, data, payload, emitted_at, stored_at
FROM events
WHERE command_id = $1 AND sequence > $2
ORDER BY sequence
LIMIT $3;

-- name: highest_event
-- The command's highest stored sequence and its kind (the exit event is last).
SELECT sequence, kind
FROM events
WHERE command_id = $1
ORDER BY sequence DESC
LIMIT 1;

-- name: next_stored_after
-- The first stored sequence above $2, to measure the hole a reader waits at.
SELECT min(sequence) FROM events WHERE command_id = $1 AND sequence > $2;

-- name: recorded_gaps
-- Gaps the relay recorded and skipped that end after a reader's cursor ($2).
SELECT first_missing, last_missing
FROM gaps
WHERE command_id = $1 AND last_missing > $2
ORDER BY first_missing
LIMIT $3;

-- name: stored_in_recorded_gaps
-- Late events stored inside recorded gaps that end after a reader's cursor.
SELECT e.sequence
FROM gaps g
JOIN events e
  ON e.command_id = g.command_id
 AND e.sequence BETWEEN g.first_missing AND g.last_missing
WHERE g.command_id = $1 AND g.last_missing > $2
ORDER BY e.sequence;

-- name: command_state
-- The summary status of a command, to tell a reader whether it has ended.
SELECT status FROM commands WHERE id = $1;

-- name: command_detail
-- One command with its runner's name and its relay state.
SELECT c.id, c.runner_id, r.name AS runner_name, c.argv, c.cwd, c.env,
       c.created_at, c.dispatched_at, c.cancel_requested_at, c.status,
       c.exit_code, c.started_at, c.finished_at, c.last_activity_at,
       c.applied_through, c.verification, c.verification_matched,
       d.state AS delivery_state, d.delivered_through, d.last_error
FROM commands c
JOIN runners r ON r.id = c.runner_id
LEFT JOIN command_delivery d ON d.command_id = c.id
WHERE c.id = $1;

-- name: list_commands
-- The newest commands first, optionally only those created before $1.
SELECT c.id, c.runner_id, r.name AS runner_name, c.argv, c.status, c.exit_code,
       c.created_at, c.started_at, c.finished_at, c.last_activity_at,
       c.verification_matched
FROM commands c
JOIN runners r ON r.id = c.runner_id
WHERE $1::timestamptz IS NULL OR c.created_at < $1
ORDER BY c.created_at DESC, c.id
LIMIT $2;

-- name: list_runners
-- Every runner, whether it is connected, and the command it works on now.
SELECT r.id, r.name, r.created_at, r.revoked_at, r.last_seen_at,
       r.connected_at, r.disconnected_at,
       (r.connected_at IS NOT NULL
        AND (r.disconnected_at IS NULL OR r.disconnected_at < r.connected_at))
           AS connected,
       current.id AS current_command_id,
       current.argv AS current_command_argv,
       current.status AS current_command_status
FROM runners r
LEFT JOIN LATERAL (
    SELECT c.id, c.argv, c.status
    FROM commands c
    WHERE c.runner_id = r.id AND c.status IN ('dispatched', 'running')
    ORDER BY c.created_at DESC
    LIMIT 1
) current ON true
ORDER BY r.name;

-- name: stream_output
-- One stream's output data of a command, in sequence order.
SELECT data
FROM events
WHERE command_id = $1 AND kind = 'output' AND stream = $2
ORDER BY sequence;

-- name: lock_command
-- Lock a command's summary row while a delivery is applied to it.
SELECT status, applied_through FROM commands WHERE id = $1 FOR UPDATE;

-- name: record_applied_delivery
-- Remember a delivery id; returns nothing when it was applied before.
INSERT INTO applied_deliveries (delivery_id, command_id)
VALUES ($1, $2)
ON CONFLICT (delivery_id) DO NOTHING
RETURNING delivery_id;

-- name: mark_running
-- The status event: a queued or dispatched command is now running.
UPDATE commands
SET status = CASE WHEN status IN ('queued', 'dispatched') THEN 'running'
                  ELSE status END,
    started_at = coalesce(started_at, $2)
WHERE id = $1;

-- name: mark_finished
-- The exit event: the final status, exit code and end time.
UPDATE commands
SET status = $2,
    exit_code = $3,
    finished_at = coalesce(finished_at, $4),
    started_at = coalesce(started_at, $4)
WHERE id = $1;

-- name: note_activity
-- Move the last activity time and the in-order applied sequence forward.
UPDATE commands
SET last_activity_at = greatest(last_activity_at, $2),
    applied_through = greatest(applied_through, $3)
WHERE id = $1;

-- name: stored_stream_digests
-- Byte count and SHA-256 of each stream's stored output, in sequence order.
SELECT stream,
       sum(octet_length(data))::bigint AS bytes,
       encode(sha256(string_agg(data, ''::bytea ORDER BY sequence)), 'hex')
           AS sha256
FROM events
WHERE command_id = $1 AND kind = 'output'
GROUP BY stream;

-- name: exit_payload
-- The payload of a command's stored exit event, if it has one.
SELECT payload FROM events WHERE command_id = $1 AND kind = 'exit'
ORDER BY sequence DESC LIMIT 1;

-- name: store_verification
-- Keep the verification of a finished command's stored output.
UPDATE commands
SET verification = $2::jsonb, verification_matched = $3
WHERE id = $1;

-- name: replay_dead
-- Set a dead command's delivery going again at once; true when it was dead.
UPDATE command_delivery
SET state = 'active', attempts = 0, next_attempt_at = now(),
    first_failure_at = NULL, lease_owner = NULL, lease_expires_at = NULL,
    updated_at = now()
WHERE command_id = $1 AND state = 'dead'
RETURNING true;
