-- Routes per worker, kept by the database itself so placement reads one
-- column instead of counting every route of every worker on each create.
ALTER TABLE workers ADD COLUMN route_count BIGINT NOT NULL DEFAULT 0;
UPDATE workers w SET route_count = (SELECT COUNT(*) FROM routes r WHERE r.worker_id = w.id);

CREATE FUNCTION routes_count_workers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.worker_id IS NOT NULL THEN
        UPDATE workers SET route_count = route_count - 1 WHERE id = OLD.worker_id;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.worker_id IS NOT NULL THEN
        UPDATE workers SET route_count = route_count + 1 WHERE id = NEW.worker_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER routes_count_insert AFTER INSERT ON routes
    FOR EACH ROW EXECUTE FUNCTION routes_count_workers();
CREATE TRIGGER routes_count_delete AFTER DELETE ON routes
    FOR EACH ROW EXECUTE FUNCTION routes_count_workers();
CREATE TRIGGER routes_count_move AFTER UPDATE OF worker_id ON routes
    FOR EACH ROW WHEN (OLD.worker_id IS DISTINCT FROM NEW.worker_id)
    EXECUTE FUNCTION routes_count_workers();
