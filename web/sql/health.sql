-- name: queue_depth
-- Stored events the relay has not delivered yet, over every unfinished command.
SELECT coalesce(sum(highest.sequence - d.delivered_through), 0)::bigint
FROM command_delivery d
CROSS JOIN LATERAL (
    SELECT coalesce(max(e.sequence), 0) AS sequence
    FROM events e
    WHERE e.command_id = d.command_id
) highest
WHERE d.state <> 'finished' AND highest.sequence > d.delivered_through;

-- name: dead_count
-- Commands whose delivery the relay parked as dead.
SELECT count(*) FROM command_delivery WHERE state = 'dead';

-- name: commands_by_status
-- How many commands are in each status.
SELECT status, count(*) AS count FROM commands GROUP BY status;

-- name: stored_by_bucket
-- Events stored per time bucket ($1 seconds wide) from bucket $2 on.
SELECT floor(extract(epoch FROM stored_at) / $1)::bigint AS bucket,
       count(*) AS events
FROM events
WHERE stored_at >= to_timestamp($2::bigint * $1)
GROUP BY 1;

-- name: delivered_by_bucket
-- Events delivered to the sink per time bucket ($1 seconds wide) from bucket $2 on.
SELECT floor(extract(epoch FROM delivered_at) / $1)::bigint AS bucket,
       sum(event_count) AS events
FROM deliveries
WHERE delivered_at >= to_timestamp($2::bigint * $1)
GROUP BY 1;

-- name: lag_by_bucket
-- Average and largest time from storing to delivering, per delivery bucket.
SELECT floor(extract(epoch FROM dl.delivered_at) / $1)::bigint AS bucket,
       avg(greatest(extract(epoch FROM dl.delivered_at - e.stored_at), 0))
           AS average_seconds,
       max(greatest(extract(epoch FROM dl.delivered_at - e.stored_at), 0))
           AS max_seconds
FROM deliveries dl
JOIN events e ON e.command_id = dl.command_id AND e.sequence = dl.last_sequence
WHERE dl.delivered_at >= to_timestamp($2::bigint * $1)
GROUP BY 1;

-- name: dead_letters
-- Commands whose delivery is parked as dead, newest failure first.
SELECT d.command_id, c.argv, r.name AS runner_name, d.delivered_through,
       coalesce((SELECT max(e.sequence) FROM events e
                 WHERE e.command_id = d.command_id), 0) AS highest_stored,
       d.attempts, d.last_status, d.last_error, d.first_failure_at, d.updated_at
FROM command_delivery d
JOIN commands c ON c.id = d.command_id
JOIN runners r ON r.id = c.runner_id
WHERE d.state = 'dead'
ORDER BY d.updated_at DESC
LIMIT 200;
