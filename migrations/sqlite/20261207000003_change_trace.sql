-- The W3C trace context (`traceparent`) of the request or message that made
-- each change, when it came with one: the Backend.AI publisher hands it on
-- in the events it publishes for the change, whichever replica leads.
ALTER TABLE change_log ADD COLUMN trace TEXT;
