-- name: system_figures
-- The one row of system totals, ingest rate and queue depth.
SELECT * FROM audit_system;

-- name: runner_figures
-- Every runner's rolled-up figures, by name.
SELECT * FROM audit_runners ORDER BY runner_name;

-- name: problem_commands
-- Up to $2 commands that lost events, are dead, or are stuck longer than $1 (events pending, or sent to a runner that never answered); worst first, with the count of stuck commands.
WITH judged AS (
    SELECT
        a.*,
        r.name AS runner_name,
        c.dispatched_at,
        a.status = 'dispatched' AND a.events_stored = 0
            AND c.dispatched_at < now() - $1::interval AS unanswered,
        coalesce(a.oldest_pending_age > $1, false)
            OR (a.status = 'dispatched' AND a.events_stored = 0
                AND c.dispatched_at < now() - $1::interval) AS stuck
    FROM audit_commands AS a
    JOIN runners AS r ON r.id = a.runner_id
    JOIN commands AS c ON c.id = a.command_id
)
SELECT
    *,
    count(*) FILTER (WHERE stuck) OVER () AS stuck_commands
FROM judged
WHERE lost OR dead OR stuck
ORDER BY lost DESC, dead DESC, oldest_pending_at, created_at
LIMIT $2;
