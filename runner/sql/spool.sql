-- name: create_schema
-- The spool's tables: accepted commands, unacknowledged events, refused events.
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,
    next_sequence INTEGER NOT NULL DEFAULT 1,
    pid INTEGER,
    finished INTEGER NOT NULL DEFAULT 0,
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    stream TEXT,
    data BLOB NOT NULL,
    payload TEXT,
    emitted_at REAL NOT NULL,
    size INTEGER NOT NULL,
    UNIQUE (command_id, sequence)
);
CREATE TABLE IF NOT EXISTS refused (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    stream TEXT,
    data BLOB NOT NULL,
    payload TEXT,
    emitted_at REAL NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    refused_at REAL NOT NULL
);

-- name: spool_totals
-- Bytes counted against the budget and number of events held.
SELECT coalesce(sum(size), 0), count(*) FROM events;

-- name: find_command
-- Whether a command was accepted, and whether its exit event is spooled.
SELECT finished FROM commands WHERE command_id = ?;

-- name: accept_command
-- Record a newly accepted command; its numbering starts at 1.
INSERT INTO commands (command_id, accepted_at) VALUES (?, ?);

-- name: record_pid
-- Remember the pid of a command's child.
UPDATE commands SET pid = ? WHERE command_id = ?;

-- name: unfinished_commands
-- Commands whose exit event was never spooled, oldest first.
SELECT command_id, pid, stdout_bytes, stderr_bytes
FROM commands WHERE finished = 0 ORDER BY accepted_at;

-- name: next_sequence
-- The sequence the command's next event gets.
SELECT next_sequence FROM commands WHERE command_id = ?;

-- name: insert_event
-- Store a new event; its row number fixes the sending order.
INSERT INTO events
    (command_id, sequence, id, kind, stream, data, payload, emitted_at, size)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: advance_command
-- Move a command's numbering past new events and count their output bytes.
UPDATE commands
SET next_sequence = next_sequence + ?,
    stdout_bytes = stdout_bytes + ?,
    stderr_bytes = stderr_bytes + ?,
    finished = finished OR ?
WHERE command_id = ?;

-- name: events_after
-- Events made after a row, in sending order.
SELECT row, command_id, sequence, id, kind, stream, data, payload, emitted_at, size
FROM events WHERE row > ? ORDER BY row LIMIT ?;

-- name: events_in_rows
-- The events still held among a JSON array of rows.
SELECT row, command_id, sequence, id, kind, stream, data, payload, emitted_at, size
FROM events WHERE row IN (SELECT value FROM json_each(?)) ORDER BY row;

-- name: pending_for_command
-- Events of a command still waiting for an acknowledgement.
SELECT count(*) FROM events WHERE command_id = ?;

-- name: any_pending_for_command
-- Whether a command has any event still waiting for an acknowledgement.
SELECT 1 FROM events WHERE command_id = ? LIMIT 1;

-- name: delete_acknowledged
-- Drop acknowledged events, given as a JSON array of [command, sequence, id].
DELETE FROM events
WHERE row IN (
    SELECT events.row
    FROM json_each(?) AS acknowledged
    JOIN events
      ON events.command_id = acknowledged.value ->> 0
     AND events.sequence = acknowledged.value ->> 1
     AND events.id = acknowledged.value ->> 2
)
RETURNING row, size;

-- name: find_event_by_id
-- The row and size of a held event, by its id (a scan; refusals are rare).
SELECT row, size FROM events WHERE id = ?;

-- name: find_event_by_sequence
-- The row and size of a held event, by command and sequence.
SELECT row, size FROM events WHERE command_id = ? AND sequence = ?;

-- name: move_to_refused
-- Copy a held event into the refused table with the broker's code and reason.
INSERT INTO refused
    (command_id, sequence, id, kind, stream, data, payload, emitted_at,
     code, reason, refused_at)
SELECT command_id, sequence, id, kind, stream, data, payload, emitted_at, ?, ?, ?
FROM events WHERE row = ?;

-- name: delete_row
-- Drop a held event by its row.
DELETE FROM events WHERE row = ?;

-- name: recent_refused
-- The most recently refused events, newest first.
SELECT command_id, sequence, id, kind, code, reason, refused_at
FROM refused ORDER BY row DESC LIMIT ?;

-- name: count_refused
-- How many events were refused and moved aside.
SELECT count(*) FROM refused;

-- name: count_unfinished
-- How many accepted commands have no exit event yet.
SELECT count(*) FROM commands WHERE finished = 0;
