-- An event's usage is applied by the statement that inserts its audit row, and only when that
-- insert did not conflict: the audit row is the replay guard. `usage_events_applied` is no
-- longer written (one row and two index entries less per request); it stays for instances of
-- the previous build during a rolling upgrade, and the audit writer's retention empties it.
COMMENT ON TABLE usage_events_applied IS
    'unused: superseded by audit_log (event_id, ts); emptied by retention, safe to drop';
