-- Which replica leads, and the URL the other replicas reach it at (see the
-- PostgreSQL migration). With SQLite there is one process, which always
-- leads: the table stays empty; it is here so both schemas match.
CREATE TABLE leader_peer (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    replica  BLOB    NOT NULL,
    peer_url TEXT,
    since    TEXT    NOT NULL
);
