-- Why a Backend.AI circuit stays on its lost worker instead of moving (a move
-- would change the URL its Manager keeps); NULL for every other route. Status,
-- not spec: setting it is no revision and no event.
ALTER TABLE routes ADD COLUMN stranded_reason TEXT;
CREATE INDEX routes_stranded_idx ON routes (worker_id) WHERE stranded_reason IS NOT NULL;
