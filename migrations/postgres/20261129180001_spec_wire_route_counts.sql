-- Each route's spec as it appears in the route's JSON (two runs of fields,
-- see `domain::route_json`), written with the spec, so a snapshot splices
-- routes together instead of decoding and re-encoding every spec. NULL for
-- rows written without it; an update that changes the spec without it clears
-- it, so it is never stale.
ALTER TABLE routes ADD COLUMN spec_wire TEXT;

CREATE FUNCTION routes_spec_wire_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.spec_wire := NULL;
    RETURN NEW;
END;
$$;
CREATE TRIGGER routes_spec_wire_stale BEFORE UPDATE OF spec ON routes
    FOR EACH ROW WHEN (NEW.spec IS DISTINCT FROM OLD.spec AND NEW.spec_wire IS NOT DISTINCT FROM OLD.spec_wire)
    EXECUTE FUNCTION routes_spec_wire_clear();

-- Route counts once per statement instead of once per row: a batch of 64
-- creates on 4 workers updates 4 worker rows, not 64 (moves stay per row).
DROP TRIGGER routes_count_insert ON routes;
DROP TRIGGER routes_count_delete ON routes;

CREATE FUNCTION routes_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workers w SET route_count = w.route_count + n.added
    FROM (SELECT worker_id, COUNT(*) AS added FROM new_routes
          WHERE worker_id IS NOT NULL GROUP BY worker_id) n
    WHERE w.id = n.worker_id;
    RETURN NULL;
END;
$$;
CREATE FUNCTION routes_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workers w SET route_count = w.route_count - n.removed
    FROM (SELECT worker_id, COUNT(*) AS removed FROM old_routes
          WHERE worker_id IS NOT NULL GROUP BY worker_id) n
    WHERE w.id = n.worker_id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER routes_count_insert AFTER INSERT ON routes
    REFERENCING NEW TABLE AS new_routes
    FOR EACH STATEMENT EXECUTE FUNCTION routes_count_inserted();
CREATE TRIGGER routes_count_delete AFTER DELETE ON routes
    REFERENCING OLD TABLE AS old_routes
    FOR EACH STATEMENT EXECUTE FUNCTION routes_count_deleted();
