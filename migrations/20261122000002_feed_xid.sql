-- The transaction that made each change. Ids are allocated at insert but become visible at
-- commit, out of order; a cached read keeps its snapshot and compares it with the change's
-- transaction to know whether it saw the change (`max(id)` alone cannot tell).
ALTER TABLE revocations ADD COLUMN xid BIGINT DEFAULT (pg_current_xact_id()::text::bigint);

-- Retention of the replay-idempotency table deletes by age.
CREATE INDEX usage_events_applied_at_idx ON usage_events_applied (applied_at);
