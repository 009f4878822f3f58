-- Why a route without a worker could not be placed (shown while it is Pending).
ALTER TABLE routes ADD COLUMN pending_reason TEXT;
