-- Routes per worker, kept by the database itself (see the PostgreSQL migration).
ALTER TABLE workers ADD COLUMN route_count INTEGER NOT NULL DEFAULT 0;
UPDATE workers SET route_count = (SELECT COUNT(*) FROM routes r WHERE r.worker_id = workers.id);

CREATE TRIGGER routes_count_insert AFTER INSERT ON routes
    WHEN NEW.worker_id IS NOT NULL
BEGIN
    UPDATE workers SET route_count = route_count + 1 WHERE id = NEW.worker_id;
END;

CREATE TRIGGER routes_count_delete AFTER DELETE ON routes
    WHEN OLD.worker_id IS NOT NULL
BEGIN
    UPDATE workers SET route_count = route_count - 1 WHERE id = OLD.worker_id;
END;

CREATE TRIGGER routes_count_move AFTER UPDATE OF worker_id ON routes
    WHEN OLD.worker_id IS NOT NEW.worker_id
BEGIN
    UPDATE workers SET route_count = route_count - 1 WHERE id = OLD.worker_id;
    UPDATE workers SET route_count = route_count + 1 WHERE id = NEW.worker_id;
END;
