-- Each route's spec as it appears in the route's JSON (see the PostgreSQL
-- migration); cleared by an update that changes the spec without it.
ALTER TABLE routes ADD COLUMN spec_wire TEXT;

CREATE TRIGGER routes_spec_wire_stale AFTER UPDATE OF spec ON routes
    WHEN NEW.spec IS NOT OLD.spec AND NEW.spec_wire IS OLD.spec_wire
BEGIN
    UPDATE routes SET spec_wire = NULL WHERE id = NEW.id;
END;
