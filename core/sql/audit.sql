-- name: system_figures
-- The one row of system totals, ingest rate and queue depth.
SELECT * FROM audit_system;

-- name: runner_figures
-- Every runner's rolled-up figures, by name.
SELECT * FROM audit_runners ORDER BY runner_name;

-- name: problem_counts
-- How many commands lost events, are dead, or have events pending longer than $1.
SELECT
    count(*) AS commands_checked,
    count(*) FILTER (WHERE lost) AS lost,
    count(*) FILTER (WHERE dead) AS dead,
    count(*) FILTER (WHERE oldest_pending_age > $1) AS stuck
FROM audit_commands;

-- name: problem_commands
-- Up to $2 commands that lost events, are dead, or have events pending longer than $1; worst first.
SELECT
    a.*,
    r.name AS runner_name,
    a.oldest_pending_age > $1 AS stuck
FROM audit_commands AS a
JOIN runners AS r ON r.id = a.runner_id
WHERE a.lost OR a.dead OR a.oldest_pending_age > $1
ORDER BY a.lost DESC, a.dead DESC, a.oldest_pending_at, a.created_at
LIMIT $2;
