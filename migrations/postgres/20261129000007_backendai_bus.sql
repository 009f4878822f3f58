-- The Backend.AI event bus (src/backendai/bus.rs). The last change-log
-- revision the leader published on Redis: a restarted coordinator or a new
-- leader resumes after it.
ALTER TABLE coordinator_state ADD COLUMN bus_revision BIGINT NOT NULL DEFAULT 0;

-- What each Backend.AI worker was last told about a route: the circuit as
-- published (a removal must name the port or subdomain the worker holds, and
-- the worker's authority even once the worker is gone), the revision of its
-- created event, and whether the worker acknowledged that event.
CREATE TABLE bus_circuits (
    route_id  UUID    PRIMARY KEY,
    worker_id UUID    NOT NULL,
    authority TEXT    NOT NULL,
    circuit   JSONB   NOT NULL,
    revision  BIGINT  NOT NULL,
    acked     BIGINT  NOT NULL DEFAULT 0 CHECK (acked IN (0, 1))
);
CREATE INDEX bus_circuits_worker_idx ON bus_circuits (worker_id);
