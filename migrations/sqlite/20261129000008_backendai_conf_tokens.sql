-- Backend.AI conf tokens: `POST /v2/conf` stores where an interactive app
-- of a session listens, and `GET /v2/proxy/auth` turns the token into a
-- route. The columns upstream keeps (its `tokens` table); like upstream's,
-- tokens do not expire. Not routes: no revision, no change log.
CREATE TABLE backendai_conf_tokens (
    id                  BLOB    PRIMARY KEY,
    login_session_token TEXT,
    kernel_host         TEXT    NOT NULL,
    kernel_port         INTEGER NOT NULL CHECK (kernel_port BETWEEN 1 AND 65535),
    session_id          BLOB    NOT NULL,
    user_uuid           BLOB    NOT NULL,
    group_id            BLOB    NOT NULL,
    access_key          TEXT    NOT NULL,
    domain_name         TEXT    NOT NULL,
    created_at          TEXT    NOT NULL
);
