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

-- name: lock_runner_epochs
-- The current epoch of each runner, locked until commit so no fence can pass it.
SELECT id, connection_epoch
FROM runners
WHERE id = ANY($1::uuid[])
ORDER BY id
FOR SHARE;

-- name: command_owners
-- Each command's runner and the highest sequence stored for it so far.
SELECT c.id,
       c.runner_id,
       (SELECT max(e.sequence) FROM events AS e WHERE e.command_id = c.id)
           AS highest_sequence
FROM commands AS c
WHERE c.id = ANY($1::uuid[]);

-- name: insert_events
-- Store a batch of events; a stored key or id is left untouched; returns the new keys.
INSERT INTO events (command_id, sequence, id, kind, stream, data, payload, emitted_at)
SELECT batch.command_id, batch.sequence, batch.id, batch.kind, batch.stream,
       batch.data, batch.payload::jsonb, batch.emitted_at
FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::text[],
            $6::bytea[], $7::text[], $8::timestamptz[])
    AS batch(command_id, sequence, id, kind, stream, data, payload, emitted_at)
ON CONFLICT DO NOTHING
RETURNING command_id, sequence;

-- name: compare_with_stored
-- For events not inserted: whether the stored event at their key or id is the same.
SELECT batch.position,
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
            $6::text[], $7::bytea[], $8::text[])
    AS batch(position, command_id, sequence, id, kind, stream, data, payload)
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

-- name: notify_events
-- Wake the relay and the web tier's long polls for each command that grew.
SELECT pg_notify($1, command_id::text)
FROM unnest($2::uuid[]) AS batch(command_id);
