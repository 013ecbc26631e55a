-- The BLAKE3 of each verified object, computed from the same bytes as the
-- SHA-256 when the server reads a completed upload back. Agents check
-- downloads against it: the same assurance as the SHA-256 for a third of
-- the CPU. Objects verified before it was recorded have none, and agents
-- check their SHA-256 as before.
ALTER TABLE project_objects
    ADD COLUMN blake3 text CHECK (blake3 IS NULL OR blake3 ~ '^[0-9a-f]{64}$');
