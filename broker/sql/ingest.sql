-- name: find_runner_by_token_hash
-- The runner a token hash belongs to, revoked or not.
SELECT id, name, token_hash, revoked_at
FROM runners
WHERE token_hash = $1;

-- name: open_connection
-- Raise a runner's connection epoch, fencing off its older connections; returns it.
UPDATE runners
SET connection_epoch = connection_epoch + 1,
    connected_at = now(),
    last_seen_at = now(),
    broker_id = $2
WHERE id = $1 AND revoked_at IS NULL
RETURNING connection_epoch;

-- name: close_connection
-- Record a runner's disconnection, unless a newer connection took its place.
UPDATE runners
SET disconnected_at = now(), last_seen_at = now()
WHERE id = $1 AND connection_epoch = $2;

-- name: mark_runners_seen
-- Note that runners connected here are alive, unless a newer connection took over.
UPDATE runners AS r
SET last_seen_at = now()
FROM unnest($1::uuid[], $2::bigint[]) AS seen(id, connection_epoch)
WHERE r.id = seen.id AND r.connection_epoch = seen.connection_epoch;

-- name: store_events
-- Store a batch in one statement: only for current connections and own commands.
WITH batch AS (
    SELECT *
    FROM unnest($1::int[], $2::uuid[], $3::bigint[], $4::uuid[], $5::text[],
                $6::text[], $7::bytea[], $8::text[], $9::float8[], $10::uuid[],
                $11::bigint[])
        AS batch(position, command_id, sequence, id, kind, stream, data, payload,
                 emitted_at, runner_id, connection_epoch)
),
-- The first event of the batch with a key (or id) is the one inserted; later
-- ones are compared with the stored event afterwards.
candidates AS (
    SELECT *
    FROM (
        SELECT batch.*,
               row_number() OVER (PARTITION BY command_id, sequence
                                  ORDER BY position) AS nth_of_key,
               row_number() OVER (PARTITION BY command_id, id
                                  ORDER BY position) AS nth_of_id
        FROM batch
    ) AS numbered
    WHERE nth_of_key = 1 AND nth_of_id = 1
),
-- Locked until commit: a newer connection's epoch cannot pass these writes.
current_connections AS (
    SELECT id, connection_epoch
    FROM runners
    WHERE id IN (SELECT DISTINCT runner_id FROM batch) AND revoked_at IS NULL
    ORDER BY id
    FOR SHARE
),
-- Who may write each command: its runner, through its current connection.
-- One lookup object, so checking an event costs the same however many
-- runners share the batch.
writers AS MATERIALIZED (
    SELECT jsonb_object_agg(
               c.id::text, r.id::text || ' ' || r.connection_epoch
           ) AS by_command
    FROM current_connections AS r
    JOIN commands AS c ON c.runner_id = r.id
    WHERE c.id IN (SELECT DISTINCT command_id FROM batch)
),
-- Read in the statement's snapshot, so before this batch's rows.
highest_before AS (
    SELECT grown.command_id,
           (SELECT max(e.sequence) FROM events AS e
            WHERE e.command_id = grown.command_id) AS sequence
    FROM (SELECT DISTINCT command_id FROM batch) AS grown
),
inserted AS (
    INSERT INTO events (command_id, sequence, id, kind, stream, data, payload,
                        emitted_at)
    SELECT c.command_id, c.sequence, c.id, c.kind, c.stream, c.data,
           c.payload::jsonb, to_timestamp(c.emitted_at)
    FROM candidates AS c, writers AS w
    WHERE w.by_command ->> c.command_id::text
          = c.runner_id::text || ' ' || c.connection_epoch
    ON CONFLICT DO NOTHING
    RETURNING command_id, sequence
),
notified AS (
    SELECT pg_notify($12, grown.command_id::text)
    FROM (SELECT DISTINCT command_id FROM inserted) AS grown
)
SELECT 'stored' AS row_kind, command_id, sequence FROM inserted
UNION ALL
SELECT 'highest_before', command_id, sequence FROM highest_before
UNION ALL
SELECT 'notified', NULL, NULL FROM notified;

-- name: highest_sequences
-- The highest stored sequence of each command, to number legacy events after it.
SELECT command_id, max(sequence) AS highest
FROM events
WHERE command_id = ANY($1::uuid[])
GROUP BY command_id;

-- name: classify_unstored
-- Why events were not stored: the same event stored, a conflict, or no right.
SELECT batch.position,
       owner.runner_id AS command_runner_id,
       runner.revoked_at IS NULL
           AND runner.connection_epoch = batch.connection_epoch AS current,
       at_key.id AS id_at_key,
       at_key.id IS NOT NULL
           AND at_key.id = batch.id
           AND at_key.kind = batch.kind
           AND at_key.stream IS NOT DISTINCT FROM batch.stream
           AND at_key.data = batch.data
           AND at_key.payload IS NOT DISTINCT FROM batch.payload::jsonb
           AS same_at_key,
       by_id.sequence AS sequence_of_id,
       by_id.sequence IS NOT NULL
           AND by_id.kind = batch.kind
           AND by_id.stream IS NOT DISTINCT FROM batch.stream
           AND by_id.data = batch.data
           AND by_id.payload IS NOT DISTINCT FROM batch.payload::jsonb
           AS same_by_id
FROM unnest($1::int[], $2::uuid[], $3::bigint[], $4::uuid[], $5::text[],
            $6::text[], $7::bytea[], $8::text[], $9::uuid[], $10::bigint[])
    AS batch(position, command_id, sequence, id, kind, stream, data, payload,
             runner_id, connection_epoch)
LEFT JOIN runners AS runner ON runner.id = batch.runner_id
LEFT JOIN commands AS owner ON owner.id = batch.command_id
LEFT JOIN events AS at_key
    ON at_key.command_id = batch.command_id AND at_key.sequence = batch.sequence
LEFT JOIN events AS by_id
    ON by_id.command_id = batch.command_id AND by_id.id = batch.id;

-- name: insert_refused_events
-- Record events refused for good, so operators can audit them.
INSERT INTO refused_events (runner_id, command_id, sequence, event_id, code, reason)
SELECT *
FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[],
            $6::text[]);
