-- The values of project secrets, sealed with the server's secrets key
-- (XChaCha20-Poly1305; the project, name and value id are bound in as
-- associated data, so a sealed value cannot be moved to another secret).
-- Kept outside the event log: the log records only that a secret was set
-- or deleted, by whom, and its version and value id. A row whose value id
-- no event names (a set that lost a race, or a deleted secret's) is
-- removed by the next set or delete of that secret.
CREATE TABLE project_secret_values
(
    value_id   uuid PRIMARY KEY,
    project_id uuid        NOT NULL,
    name       text        NOT NULL,
    -- Which key sealed it: the first 8 bytes of the key's SHA-256, in hex.
    key_id     text        NOT NULL,
    nonce      bytea       NOT NULL,
    sealed     bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX project_secret_values_by_secret ON project_secret_values (project_id, name);
