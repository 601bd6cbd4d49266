-- Queries of the outbox relay (broker/relay.py).
--
-- Every statement here runs on its own or in a short transaction that never
-- spans an HTTP request: claim and read (one statement, committed), deliver,
-- then record the outcome.

-- name: claim_command
-- Lease the least recently served command that has events to deliver and is due,
-- choose its next batch (bounded by count and bytes) and read it, in one trip.
WITH candidate AS (
    SELECT cd.command_id, cd.delivered_through, cd.pending_first_sequence,
           cd.pending_last_sequence
    FROM command_delivery cd
    WHERE cd.state = 'active'
      AND (cd.lease_expires_at IS NULL OR cd.lease_expires_at < now())
      AND (
          cd.next_attempt_at IS NULL
          OR cd.next_attempt_at <= now()
          -- A command held for a gap (no failed attempt) is due again as soon
          -- as the missing sequence arrives.
          OR (cd.attempts = 0 AND EXISTS (
              SELECT 1 FROM events e
              WHERE e.command_id = cd.command_id
                AND e.sequence = cd.delivered_through + 1
          ))
      )
      AND (
          -- max() is one step down the primary key, whatever the statistics say.
          (SELECT max(e.sequence) FROM events e WHERE e.command_id = cd.command_id)
              > cd.delivered_through
          -- Gaps are rare: look at events only under a skipped gap.
          OR EXISTS (
              SELECT 1 FROM gaps g
              WHERE g.command_id = cd.command_id
                AND g.skipped_at IS NOT NULL
                AND EXISTS (
                    SELECT 1 FROM events e
                    WHERE e.command_id = g.command_id
                      AND e.sequence BETWEEN g.first_missing AND g.last_missing
                      AND NOT EXISTS (
                          SELECT 1 FROM deliveries d
                          WHERE d.command_id = e.command_id
                            AND d.late
                            AND e.sequence BETWEEN d.first_sequence
                                               AND d.last_sequence
                      )
                )
          )
      )
    ORDER BY cd.updated_at
    LIMIT 1
    FOR UPDATE OF cd SKIP LOCKED
), next_events AS (
    -- A delivery that was chosen before is sent again as it was; otherwise
    -- walk the primary key from the cursor and stop at the limit, however
    -- long the backlog behind it.
    SELECT e.sequence, octet_length(e.data) AS size
    FROM candidate
    CROSS JOIN LATERAL (
        SELECT sequence, data
        FROM events
        WHERE command_id = candidate.command_id
          AND sequence >= coalesce(
              candidate.pending_first_sequence, candidate.delivered_through + 1
          )
          AND sequence <= coalesce(
              candidate.pending_last_sequence, 9223372036854775807
          )
        ORDER BY sequence
        LIMIT $3
    ) AS e
), batch AS (
    -- The leading run without a break in sequence, within the byte budget;
    -- the first event always goes, however large.
    SELECT sequence
    FROM (
        SELECT sequence,
               size,
               sum(size) OVER ordered - size AS bytes_before,
               sequence - row_number() OVER ordered AS run
        FROM next_events
        WINDOW ordered AS (ORDER BY sequence)
    ) AS numbered
    WHERE (bytes_before = 0 OR bytes_before + size <= $4)
      AND run = (SELECT min(sequence) - 1 FROM next_events)
), claimed AS (
    UPDATE command_delivery cd
    SET lease_owner = $1,
        lease_expires_at = now() + make_interval(secs => $2),
        -- The batch is written down before it is sent, so a resend after any
        -- failure, even a crash, carries the same events and delivery id. A
        -- batch behind a gap is not: the gap may yet be filled.
        pending_first_sequence = coalesce(
            cd.pending_first_sequence,
            (SELECT min(sequence) FROM batch
             HAVING min(sequence) = cd.delivered_through + 1)
        ),
        pending_last_sequence = coalesce(
            cd.pending_last_sequence,
            (SELECT max(sequence) FROM batch
             HAVING min(sequence) = cd.delivered_through + 1)
        ),
        updated_at = now()
    FROM candidate
    WHERE cd.command_id = candidate.command_id
    RETURNING
        cd.command_id,
        cd.delivered_through,
        cd.attempts,
        extract(epoch FROM now() - cd.first_failure_at)::float8 AS failing_seconds,
        cd.pending_first_sequence,
        cd.pending_last_sequence,
        candidate.pending_first_sequence IS NULL AS chosen_now,
        -- Only then can late events be waiting (read_late_events finds them).
        EXISTS (
            SELECT 1 FROM gaps g
            WHERE g.command_id = cd.command_id AND g.skipped_at IS NOT NULL
        ) AS has_skipped_gaps
)
-- One row per event (or one row of NULL events when there is none).
SELECT claimed.*, e.sequence, e.id, e.kind, e.stream, e.data,
       e.payload::text AS payload, e.emitted_at, e.stored_at
FROM claimed
LEFT JOIN batch b ON true
LEFT JOIN events e
  ON e.command_id = claimed.command_id AND e.sequence = b.sequence
ORDER BY e.sequence;

-- name: read_late_events
-- Events stored inside skipped gaps that were not yet delivered late, in order.
WITH candidates AS (
    SELECT e.sequence, octet_length(e.data) AS size
    FROM gaps g
    CROSS JOIN LATERAL (
        SELECT e.sequence, e.data FROM events e
        WHERE e.command_id = g.command_id
          AND e.sequence BETWEEN g.first_missing AND g.last_missing
    ) AS e
    WHERE g.command_id = $1
      AND g.skipped_at IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM deliveries d
          WHERE d.command_id = $1
            AND d.late
            AND e.sequence BETWEEN d.first_sequence AND d.last_sequence
      )
    ORDER BY e.sequence
    LIMIT $2
), bounded AS (
    SELECT sequence, sum(size) OVER (ORDER BY sequence) - size AS bytes_before
    FROM candidates
)
SELECT e.sequence, e.id, e.kind, e.stream, e.data, e.payload::text AS payload,
       e.emitted_at, e.stored_at
FROM bounded b
JOIN events e ON e.command_id = $1 AND e.sequence = b.sequence
WHERE b.bytes_before = 0 OR b.bytes_before + octet_length(e.data) <= $3
ORDER BY e.sequence;

-- name: open_gap
-- Record (or widen) a gap being held; returns for how long it has been held.
INSERT INTO gaps AS g (command_id, first_missing, last_missing)
VALUES ($1, $2, $3)
ON CONFLICT (command_id, first_missing)
DO UPDATE SET last_missing = excluded.last_missing
RETURNING extract(epoch FROM now() - g.detected_at)::float8 AS held_seconds;

-- name: skip_gap
-- Give up waiting for a gap: mark it skipped so delivery goes on past it.
UPDATE gaps
SET skipped_at = now(), last_missing = $3
WHERE command_id = $1 AND first_missing = $2;

-- name: hold_command
-- Release a claimed command without counting an attempt, due again after a delay.
UPDATE command_delivery
SET lease_owner = NULL,
    lease_expires_at = NULL,
    next_attempt_at = now() + make_interval(secs => $3),
    updated_at = now()
WHERE command_id = $1 AND lease_owner = $2;

-- name: forget_pending
-- Drop a chosen batch whose events are gone (pruned), and release the command.
UPDATE command_delivery
SET pending_first_sequence = NULL,
    pending_last_sequence = NULL,
    lease_owner = NULL,
    lease_expires_at = NULL,
    next_attempt_at = NULL,
    updated_at = now()
WHERE command_id = $1 AND lease_owner = $2;

-- name: record_delivered
-- After a successful delivery: advance the cursor, reset failures, release, log
-- the requests in deliveries and forget held gaps the delivered events filled.
WITH advanced AS (
    UPDATE command_delivery
    SET delivered_through = greatest(delivered_through, $3),
        lease_owner = NULL,
        lease_expires_at = NULL,
        attempts = 0,
        next_attempt_at = NULL,
        first_failure_at = NULL,
        pending_first_sequence = NULL,
        pending_last_sequence = NULL,
        last_status = $4,
        last_error = NULL,
        last_delivered_at = now(),
        updated_at = now()
    WHERE command_id = $1 AND lease_owner = $2
    RETURNING command_id
), logged AS (
    INSERT INTO deliveries (
        command_id, delivery_id, first_sequence, last_sequence, event_count, late,
        attempts
    )
    SELECT advanced.command_id, d.delivery_id, d.first_sequence, d.last_sequence,
           d.event_count, $9, $10
    FROM advanced,
         unnest($5::text[], $6::bigint[], $7::bigint[], $8::int[])
             AS d (delivery_id, first_sequence, last_sequence, event_count)
    ON CONFLICT (command_id, delivery_id) DO NOTHING
), forgotten AS (
    DELETE FROM gaps g
    USING advanced
    WHERE g.command_id = advanced.command_id
      AND g.skipped_at IS NULL
      AND g.first_missing <= $3
      AND NOT $9
)
SELECT count(*) FROM advanced;

-- name: finish_if_complete
-- Mark a command finished once its exit event is delivered and no gap is unfilled.
UPDATE command_delivery cd
SET state = 'finished', updated_at = now()
WHERE cd.command_id = $1
  AND cd.state = 'active'
  AND (
      SELECT e.kind FROM events e
      WHERE e.command_id = cd.command_id AND e.sequence <= cd.delivered_through
      ORDER BY e.sequence DESC
      LIMIT 1
  ) = 'exit'
  AND (
      SELECT coalesce(sum(g.last_missing - g.first_missing + 1), 0)
      FROM gaps g
      WHERE g.command_id = cd.command_id AND g.skipped_at IS NOT NULL
  ) = (
      SELECT coalesce(sum(d.event_count), 0)
      FROM deliveries d
      WHERE d.command_id = cd.command_id AND d.late
  )
RETURNING cd.command_id;

-- name: schedule_retry
-- After a failed delivery that may succeed later: remember it, wait, release.
UPDATE command_delivery
SET attempts = attempts + 1,
    next_attempt_at = now() + make_interval(secs => $3),
    first_failure_at = coalesce(first_failure_at, now()),
    last_status = $4,
    last_error = $5,
    pending_first_sequence = $6,
    pending_last_sequence = $7,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = now()
WHERE command_id = $1 AND lease_owner = $2;

-- name: park_dead
-- After a permanent failure or exhausted retries: park until someone replays it.
UPDATE command_delivery
SET state = 'dead',
    attempts = attempts + 1,
    next_attempt_at = NULL,
    first_failure_at = coalesce(first_failure_at, now()),
    last_status = $3,
    last_error = $4,
    pending_first_sequence = $5,
    pending_last_sequence = $6,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = now()
WHERE command_id = $1 AND lease_owner = $2;

-- name: release_leases
-- On shutdown: give back every command this relay still holds.
UPDATE command_delivery
SET lease_owner = NULL, lease_expires_at = NULL
WHERE starts_with(lease_owner, $1);

-- name: count_queued_events
-- Events stored but not yet delivered, over commands not finished.
SELECT coalesce(sum(last.sequence - cd.delivered_through), 0)::bigint AS queued
FROM command_delivery cd
CROSS JOIN LATERAL (
    SELECT max(e.sequence) AS sequence FROM events e
    WHERE e.command_id = cd.command_id
) AS last
WHERE cd.state <> 'finished' AND last.sequence > cd.delivered_through;

-- name: list_dead
-- Commands parked dead, oldest first, with what went wrong.
SELECT command_id, delivered_through, attempts, first_failure_at, last_status,
       last_error, updated_at
FROM command_delivery
WHERE state = 'dead'
ORDER BY updated_at, command_id;

-- name: replay_dead
-- Put one dead command ($1), or every one ($1 NULL), back in line; its failed
-- delivery is resent as it was.
UPDATE command_delivery
SET state = 'active',
    attempts = 0,
    next_attempt_at = NULL,
    first_failure_at = NULL,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = now()
WHERE state = 'dead' AND ($1::uuid IS NULL OR command_id = $1)
RETURNING command_id;
