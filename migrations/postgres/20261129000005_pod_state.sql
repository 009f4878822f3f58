-- What Kubernetes last said about the worker's pod: Ready, NotReady or Gone
-- (NULL: unknown). It wins over what the worker says about itself.
ALTER TABLE workers ADD COLUMN pod_state TEXT;
