-- neuronetz-gateway schema, designed once for every capability (SPEC §10).
-- Settings shared by tenants and keys live in `limits` (one row per tenant, optionally one per
-- key); NULL means "inherit" (key) or "unlimited / none" (tenant). The gateway flattens a key,
-- its tenant and both limits rows with one join and caches the result.

CREATE TABLE tenants (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id            BIGSERIAL PRIMARY KEY,
    tenant_id     BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name          TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- `nz_` + 9 characters; the lookup handle, never enough to authenticate.
    prefix        TEXT NOT NULL UNIQUE CHECK (length(prefix) = 12),
    -- Argon2id PHC string of the full key; the key itself is never stored.
    key_hash      TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ,
    -- rotate-key: the successor points at the key it replaces.
    rotated_from  BIGINT REFERENCES api_keys(id) ON DELETE SET NULL
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id);

CREATE TABLE limits (
    id                 BIGSERIAL PRIMARY KEY,
    tenant_id          BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    key_id             BIGINT REFERENCES api_keys(id) ON DELETE CASCADE,
    rpm                BIGINT CHECK (rpm >= 0),
    tpm                BIGINT CHECK (tpm >= 0),
    max_concurrent     BIGINT CHECK (max_concurrent >= 0),
    budget_daily       BIGINT CHECK (budget_daily >= 0),
    budget_monthly     BIGINT CHECK (budget_monthly >= 0),
    budget_total       BIGINT CHECK (budget_total >= 0),
    allowed_models     TEXT[],
    allow_all_models   BOOLEAN,
    prompt_logging     BOOLEAN,
    prompt_log_ttl_s   BIGINT CHECK (prompt_log_ttl_s > 0),
    allowed_cidrs      CIDR[],
    max_num_ctx        BIGINT CHECK (max_num_ctx > 0),
    max_num_predict    BIGINT CHECK (max_num_predict > 0),
    keep_alive_policy  TEXT,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX limits_tenant_row ON limits (tenant_id) WHERE key_id IS NULL;
CREATE UNIQUE INDEX limits_key_row ON limits (key_id) WHERE key_id IS NOT NULL;

-- Durable token usage per period (UTC); Redis holds the hot counters and is re-seeded from here.
CREATE TABLE budget_usage (
    scope              TEXT NOT NULL CHECK (scope IN ('tenant', 'key')),
    tenant_id          BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    key_id             BIGINT NOT NULL DEFAULT 0,   -- 0 for scope = 'tenant'
    period             TEXT NOT NULL CHECK (period IN ('day', 'month', 'total')),
    period_start       DATE NOT NULL,               -- 1970-01-01 for 'total'
    requests           BIGINT NOT NULL DEFAULT 0,
    prompt_tokens      BIGINT NOT NULL DEFAULT 0,
    completion_tokens  BIGINT NOT NULL DEFAULT 0,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, tenant_id, key_id, period, period_start)
);

-- Usage events already applied to budget_usage, so a replayed batch is not counted twice.
CREATE TABLE usage_events_applied (
    event_id    UUID PRIMARY KEY,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The change feed: every change that must reach every gateway instance within a second
-- (revocation, suspension, limits/models/policy) appends a row here, from triggers, so changes
-- made directly in the database are covered too. Instances poll max(id) and NOTIFY speeds it up.
CREATE TABLE revocations (
    id          BIGSERIAL PRIMARY KEY,
    tenant_id   BIGINT,
    key_id      BIGINT,
    reason      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION nz_feed_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t BIGINT;
    k BIGINT;
BEGIN
    -- The gateway's own re-hash of a key (same key, new Argon2 parameters) changes nothing a
    -- cache holds; it marks its transaction so. A re-key from the console is a change.
    IF current_setting('nz.internal_rehash', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'tenants' THEN
        t := COALESCE(NEW.id, OLD.id);
        k := NULL;
    ELSIF TG_TABLE_NAME = 'api_keys' THEN
        t := COALESCE(NEW.tenant_id, OLD.tenant_id);
        k := COALESCE(NEW.id, OLD.id);
    ELSE
        t := COALESCE(NEW.tenant_id, OLD.tenant_id);
        k := COALESCE(NEW.key_id, OLD.key_id);
    END IF;
    INSERT INTO revocations (tenant_id, key_id, reason)
        VALUES (t, k, lower(TG_TABLE_NAME || '_' || TG_OP));
    PERFORM pg_notify('nz_changes', t::text || ':' || COALESCE(k::text, ''));
    RETURN NULL;
END $$;

CREATE TRIGGER tenants_feed AFTER UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION nz_feed_change();
-- updated_at alone is not a change anyone's cache needs to see.
CREATE TRIGGER api_keys_feed AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (ROW(OLD.tenant_id, OLD.prefix, OLD.name, OLD.key_hash, OLD.expires_at, OLD.revoked_at)
          IS DISTINCT FROM ROW(NEW.tenant_id, NEW.prefix, NEW.name, NEW.key_hash, NEW.expires_at, NEW.revoked_at))
    EXECUTE FUNCTION nz_feed_change();
CREATE TRIGGER api_keys_feed_delete AFTER DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION nz_feed_change();
CREATE TRIGGER limits_feed AFTER INSERT OR UPDATE OR DELETE ON limits
    FOR EACH ROW EXECUTE FUNCTION nz_feed_change();

-- One row per request, rejected ones included; never prompt content. Partitioned by time so
-- retention drops whole partitions; the default partition catches rows outside created ones.
CREATE TABLE audit_log (
    event_id           UUID NOT NULL,
    ts                 TIMESTAMPTZ NOT NULL,
    request_id         TEXT NOT NULL,
    tenant_id          BIGINT,
    key_id             BIGINT,
    key_prefix         TEXT,
    client_ip          INET,
    method             TEXT NOT NULL,
    path               TEXT NOT NULL,
    surface            TEXT NOT NULL,
    model              TEXT,
    stream             BOOLEAN,
    status             INTEGER NOT NULL,
    upstream_status    INTEGER,
    error_code         TEXT,
    prompt_tokens      BIGINT,
    completion_tokens  BIGINT,
    bytes_in           BIGINT,
    bytes_out          BIGINT,
    ttfb_ms            DOUBLE PRECISION,
    latency_ms         DOUBLE PRECISION,
    user_agent         TEXT,
    PRIMARY KEY (event_id, ts)
) PARTITION BY RANGE (ts);
CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;
CREATE INDEX audit_log_ts_idx ON audit_log (ts);
CREATE INDEX audit_log_tenant_ts_idx ON audit_log (tenant_id, ts);

-- Opt-in prompt logging; rows expire and a background job deletes them.
CREATE TABLE prompt_log (
    event_id    UUID PRIMARY KEY,
    ts          TIMESTAMPTZ NOT NULL,
    request_id  TEXT NOT NULL,
    tenant_id   BIGINT NOT NULL,
    key_id      BIGINT NOT NULL,
    model       TEXT,
    request     JSONB NOT NULL,
    response    TEXT,
    expires_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX prompt_log_expires_idx ON prompt_log (expires_at);
CREATE INDEX prompt_log_tenant_ts_idx ON prompt_log (tenant_id, ts);

-- Every CLI change: who, what, before and after.
CREATE TABLE admin_audit (
    id         BIGSERIAL PRIMARY KEY,
    ts         TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    before     JSONB,
    after      JSONB
);
CREATE INDEX admin_audit_ts_idx ON admin_audit (ts);
