-- See migrations/postgres: the Backend.AI event bus's position and what each
-- Backend.AI worker was last told about a route.
ALTER TABLE coordinator_state ADD COLUMN bus_revision BIGINT NOT NULL DEFAULT 0;

CREATE TABLE bus_circuits (
    route_id  BLOB    PRIMARY KEY,
    worker_id BLOB    NOT NULL,
    authority TEXT    NOT NULL,
    circuit   TEXT    NOT NULL,
    revision  INTEGER NOT NULL,
    acked     INTEGER NOT NULL DEFAULT 0 CHECK (acked IN (0, 1))
);
CREATE INDEX bus_circuits_worker_idx ON bus_circuits (worker_id);
