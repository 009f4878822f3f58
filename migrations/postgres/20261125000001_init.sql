-- The revision counter. Every write transaction locks this row first, so
-- change-log revisions are assigned and committed in one total order.
CREATE TABLE coordinator_state (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    revision BIGINT   NOT NULL CHECK (revision >= 0)
);
INSERT INTO coordinator_state (id, revision) VALUES (1, 0);

CREATE TABLE workers (
    id             UUID        PRIMARY KEY,
    name           TEXT        NOT NULL,
    -- The registration document (api_url, frontend, protocols, labels, pod, …).
    spec           JSONB       NOT NULL,
    status         TEXT        NOT NULL CHECK (status IN ('Ready', 'NotReady', 'Lost', 'Draining')),
    -- SHA-256 of the per-worker bearer token; the token itself is never stored.
    token_hash     BYTEA       NOT NULL,
    last_heartbeat TIMESTAMPTZ NOT NULL,
    acked_revision BIGINT      NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    CONSTRAINT workers_name_key UNIQUE (name)
);

CREATE TABLE routes (
    id                 UUID        PRIMARY KEY,
    app_mode           TEXT        NOT NULL CHECK (app_mode IN ('interactive', 'inference')),
    session_id         UUID,
    endpoint_id        UUID,
    service            TEXT        NOT NULL,
    protocol           TEXT        NOT NULL,
    worker_id          UUID        REFERENCES workers (id),
    frontend_port      INTEGER     CHECK (frontend_port BETWEEN 1 AND 65535),
    frontend_subdomain TEXT,
    -- The route as requested (targets, access, labels, envs, …).
    spec               JSONB       NOT NULL,
    expires_at         TIMESTAMPTZ,
    revision           BIGINT      NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    CHECK ((app_mode = 'interactive' AND session_id IS NOT NULL AND endpoint_id IS NULL)
        OR (app_mode = 'inference' AND endpoint_id IS NOT NULL)),
    CHECK (worker_id IS NOT NULL OR (frontend_port IS NULL AND frontend_subdomain IS NULL))
);
CREATE UNIQUE INDEX routes_session_service_key ON routes (session_id, service) WHERE app_mode = 'interactive';
CREATE UNIQUE INDEX routes_endpoint_key ON routes (endpoint_id) WHERE app_mode = 'inference';
CREATE UNIQUE INDEX routes_worker_port_key ON routes (worker_id, frontend_port) WHERE frontend_port IS NOT NULL;
CREATE UNIQUE INDEX routes_worker_subdomain_key ON routes (worker_id, frontend_subdomain) WHERE frontend_subdomain IS NOT NULL;
CREATE INDEX routes_worker_idx ON routes (worker_id);
CREATE INDEX routes_expires_at_idx ON routes (expires_at) WHERE expires_at IS NOT NULL;

-- One row per committed mutation, in revision order. Route events carry the
-- worker whose stream they belong to and, for upserts, the route as it was.
CREATE TABLE change_log (
    revision   BIGINT      PRIMARY KEY,
    kind       TEXT        NOT NULL CHECK (kind IN ('route_upsert', 'route_delete', 'worker_upsert', 'worker_delete')),
    route_id   UUID,
    worker_id  UUID,
    payload    JSONB,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX change_log_worker_idx ON change_log (worker_id, revision);
