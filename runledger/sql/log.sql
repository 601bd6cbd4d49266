-- name: events_page
-- The next stored events of a command after a sequence, in sequence order.
SELECT sequence, kind, stream, data, payload
FROM events
WHERE command_id = $1 AND sequence > $2
ORDER BY sequence
LIMIT $3;

-- name: command_exists
-- Whether a command with this id exists.
SELECT EXISTS (SELECT 1 FROM commands WHERE id = $1);

-- name: stored_streams
-- Byte count and SHA-256 of each stream as stored, in sequence order.
SELECT stream,
       coalesce(sum(length(data)), 0)::bigint AS bytes,
       encode(sha256(coalesce(string_agg(data, ''::bytea ORDER BY sequence),
                              ''::bytea)), 'hex') AS sha256
FROM events
WHERE command_id = $1 AND kind = 'output'
GROUP BY stream;

-- name: delivery_figures
-- Events stored, delivered and pending for one command.
SELECT count(e.sequence) AS stored,
       count(e.sequence) FILTER (WHERE e.sequence <= d.delivered_through)
           AS delivered,
       count(e.sequence) FILTER (WHERE e.sequence > d.delivered_through)
           AS pending,
       d.state
FROM command_delivery d
LEFT JOIN events e ON e.command_id = d.command_id
WHERE d.command_id = $1
GROUP BY d.state;
