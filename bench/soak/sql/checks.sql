-- name: command_states
-- The status of each of the given commands.
SELECT id, status FROM commands WHERE id = ANY($1::uuid[]);

-- name: undelivered_total
-- Events stored and not yet delivered, over all commands (one index probe each).
SELECT coalesce(sum(greatest(
           (SELECT max(e.sequence) FROM events AS e WHERE e.command_id = d.command_id)
               - d.delivered_through,
           0)), 0)
FROM command_delivery AS d;

-- name: events_inserted
-- Rows ever inserted into events, from the statistics (cheap; lags a second).
SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables WHERE relname = 'events';

-- name: command_logs
-- Per command: status, log shape (count, bounds, distinct ids, exit events) and relay state.
SELECT c.id,
       c.status,
       c.verification_matched,
       count(e.sequence) AS events,
       coalesce(min(e.sequence), 0) AS first_sequence,
       coalesce(max(e.sequence), 0) AS last_sequence,
       count(DISTINCT e.id) AS distinct_ids,
       count(*) FILTER (WHERE e.kind = 'exit') AS exit_events,
       coalesce(max(e.sequence) FILTER (WHERE e.kind = 'exit'), 0) AS exit_sequence,
       d.delivered_through,
       d.state AS delivery_state
FROM commands AS c
LEFT JOIN events AS e ON e.command_id = c.id
LEFT JOIN command_delivery AS d ON d.command_id = c.id
GROUP BY c.id, d.delivered_through, d.state;

-- name: stored_streams
-- Bytes and SHA-256 of each output stream of one command, in sequence order.
SELECT stream,
       coalesce(sum(length(data)), 0) AS bytes,
       encode(sha256(string_agg(data, ''::bytea ORDER BY sequence)), 'hex') AS sha256
FROM events
WHERE command_id = $1 AND kind = 'output'
GROUP BY stream;

-- name: stored_stream_bytes
-- The whole stored output of one stream of one command, in sequence order.
SELECT coalesce(string_agg(data, ''::bytea ORDER BY sequence), ''::bytea)
FROM events
WHERE command_id = $1 AND kind = 'output' AND stream = $2;

-- name: refused_total
-- Events refused for good by the broker.
SELECT count(*) FROM refused_events;

-- name: gaps_total
-- Gaps the relay recorded (a sequence missing while a later one is stored).
SELECT count(*) FROM gaps;
