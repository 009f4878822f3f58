-- Removals published on the Backend.AI event bus, kept for a while so the
-- leader's anti-entropy sweep (src/backendai/publish/resend.rs) can send them
-- again: a removed event has no acknowledgement, and a worker that missed one
-- keeps serving the circuit. The circuit as published (a worker removes by
-- port or subdomain), on the worker's authority.
CREATE TABLE bus_removals (
    route_id   UUID        NOT NULL,
    revision   BIGINT      NOT NULL,
    authority  TEXT        NOT NULL,
    circuit    JSONB       NOT NULL,
    removed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (route_id, revision)
);
CREATE INDEX bus_removals_removed_at_idx ON bus_removals (removed_at);
