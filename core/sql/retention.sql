-- name: find_candidates
-- A page of finished commands past cutoff $1, after ($3, $4) in (finished_at, id) order; $2 rows.
SELECT c.id AS command_id, c.finished_at, p.command_id IS NOT NULL AS resuming
FROM commands AS c
JOIN command_delivery AS cd ON cd.command_id = c.id
LEFT JOIN pruned_commands AS p ON p.command_id = c.id
WHERE c.status IN ('succeeded', 'failed', 'cancelled', 'lost')
  AND c.finished_at < $1
  AND cd.state <> 'dead'
  AND p.completed_at IS NULL
  AND (c.finished_at, c.id) > ($3, $4)
ORDER BY c.finished_at, c.id
LIMIT $2;

-- name: lock_delivery_state
-- Lock a command's relay state unless a relay holds a live lease on it; returns its state.
SELECT state
FROM command_delivery
WHERE command_id = $1
  AND (lease_expires_at IS NULL OR lease_expires_at < now())
FOR UPDATE SKIP LOCKED;

-- name: audit_figures
-- The audit's verdict on one command, to decide whether it is safe to prune.
SELECT
    events_stored,
    highest_sequence,
    delivered_events,
    pending_events,
    dead_events,
    missing_events,
    lost,
    dead,
    verification_matched
FROM audit_commands
WHERE command_id = $1;

-- name: start_pruning
-- Record that a command's rows are being removed, before the first batch.
INSERT INTO pruned_commands (command_id, highest_sequence)
VALUES ($1, $2)
ON CONFLICT (command_id) DO NOTHING;

-- name: delete_event_batch
-- Remove up to $2 of a command's events stored before pruning began, highest sequence first.
WITH batch AS (
    SELECT sequence
    FROM events
    WHERE command_id = $1
      -- An event stored since the command was judged fully delivered was not
      -- part of that judgement; it stays for the relay.
      AND stored_at <= (SELECT started_at FROM pruned_commands WHERE command_id = $1)
    ORDER BY sequence DESC
    LIMIT $2
)
DELETE FROM events AS e
USING batch
WHERE e.command_id = $1 AND e.sequence = batch.sequence;

-- name: count_removed_events
-- Add a batch to a pruned command's tally.
UPDATE pruned_commands
SET events_removed = events_removed + $2
WHERE command_id = $1;

-- name: delete_delivery_batch
-- Remove up to $2 of a command's deliveries rows.
DELETE FROM deliveries
WHERE command_id = $1
  AND delivery_id IN (
      SELECT delivery_id FROM deliveries WHERE command_id = $1 LIMIT $2
  );

-- name: delete_gap_batch
-- Remove up to $2 of a command's recorded gaps.
DELETE FROM gaps
WHERE command_id = $1
  AND first_missing IN (
      SELECT first_missing FROM gaps WHERE command_id = $1 LIMIT $2
  );

-- name: delete_applied_delivery_batch
-- Remove up to $2 of the web tier's applied-delivery marks for a command.
DELETE FROM applied_deliveries
WHERE delivery_id IN (
    SELECT delivery_id FROM applied_deliveries WHERE command_id = $1 LIMIT $2
);

-- name: finish_pruning
-- Mark a command's pruning complete.
UPDATE pruned_commands SET completed_at = now() WHERE command_id = $1;
