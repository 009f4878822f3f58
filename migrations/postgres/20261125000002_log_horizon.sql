-- Change-log rows up to this revision have been compacted away; a stream that
-- resumes from an older revision gets a snapshot instead of a silent gap.
ALTER TABLE coordinator_state ADD COLUMN compacted_revision BIGINT NOT NULL DEFAULT 0;
