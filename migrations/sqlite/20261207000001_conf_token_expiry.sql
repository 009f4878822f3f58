-- Conf tokens now expire (`backendai_conf_token_ttl`): each insert deletes
-- the expired ones, found by their creation time.
CREATE INDEX backendai_conf_tokens_created_at_idx ON backendai_conf_tokens (created_at);
