-- Same schema as migrations/postgres, in SQLite's types: UUIDs as 16-byte
-- BLOBs, timestamps as RFC 3339 TEXT, JSON as TEXT.
CREATE TABLE coordinator_state (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL CHECK (revision >= 0)
);
INSERT INTO coordinator_state (id, revision) VALUES (1, 0);

CREATE TABLE workers (
    id             BLOB    PRIMARY KEY,
    name           TEXT    NOT NULL,
    spec           TEXT    NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN ('Ready', 'NotReady', 'Lost', 'Draining')),
    token_hash     BLOB    NOT NULL,
    last_heartbeat TEXT    NOT NULL,
    acked_revision INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL,
    CONSTRAINT workers_name_key UNIQUE (name)
);

CREATE TABLE routes (
    id                 BLOB    PRIMARY KEY,
    app_mode           TEXT    NOT NULL CHECK (app_mode IN ('interactive', 'inference')),
    session_id         BLOB,
    endpoint_id        BLOB,
    service            TEXT    NOT NULL,
    protocol           TEXT    NOT NULL,
    worker_id          BLOB    REFERENCES workers (id),
    frontend_port      INTEGER CHECK (frontend_port BETWEEN 1 AND 65535),
    frontend_subdomain TEXT,
    spec               TEXT    NOT NULL,
    expires_at         TEXT,
    revision           INTEGER NOT NULL,
    created_at         TEXT    NOT NULL,
    updated_at         TEXT    NOT NULL,
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

CREATE TABLE change_log (
    revision   INTEGER PRIMARY KEY,
    kind       TEXT    NOT NULL CHECK (kind IN ('route_upsert', 'route_delete', 'worker_upsert', 'worker_delete')),
    route_id   BLOB,
    worker_id  BLOB,
    payload    TEXT,
    created_at TEXT    NOT NULL
);
CREATE INDEX change_log_worker_idx ON change_log (worker_id, revision);
