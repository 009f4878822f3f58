-- Which replica leads, and the URL the other replicas reach it at: a
-- replica that does not lead sends its route creates there, so that one
-- create writer commits every replica's creates (src/store/create_writer/
-- forward.rs). Written by the leader; NULL peer_url: it takes none.
CREATE TABLE leader_peer (
    id       SMALLINT    PRIMARY KEY CHECK (id = 1),
    replica  UUID        NOT NULL,
    peer_url TEXT,
    since    TIMESTAMPTZ NOT NULL
);
