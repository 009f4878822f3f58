-- See migrations/postgres: removals published on the Backend.AI event bus,
-- kept for the anti-entropy sweep.
CREATE TABLE bus_removals (
    route_id   BLOB    NOT NULL,
    revision   INTEGER NOT NULL,
    authority  TEXT    NOT NULL,
    circuit    TEXT    NOT NULL,
    removed_at TEXT    NOT NULL,
    PRIMARY KEY (route_id, revision)
);
CREATE INDEX bus_removals_removed_at_idx ON bus_removals (removed_at);
