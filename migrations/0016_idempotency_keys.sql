-- Requests made with an Idempotency-Key header (POST /tasks and
-- POST /tasks/{id}/cancel), so that a client may send one again after a
-- timeout or a broken connection and get the first answer instead of a
-- second effect.
--
-- These are not events: a key lives for a day and only says which answer
-- a retry gets. The effects themselves (a task submitted or cancelled) are
-- in the event log as always.
--
-- A row is, by its columns:
--   answered     status, body (and location) hold the first answer, which
--                every retry with the same request gets
--   in progress  claim names the request working on it since claimed_at;
--                a retry waits for its answer
--   free         claim is NULL (the request failed with a server error,
--                so its outcome is unknown) or its claimant went silent:
--                the next retry with the same request takes it over, with
--                the same task_id, so a task is never submitted twice
CREATE TABLE idempotency_keys
(
    user_name      text        NOT NULL,
    key            text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- SHA-256 of the method, the path and the body (as canonical JSON):
    -- the same key with another request is refused.
    request_sha256 bytea       NOT NULL,
    -- The id a submission gives its task, fixed when the key is first
    -- used: the Task aggregate refuses a second submission under it.
    task_id        uuid        NOT NULL,
    claim          uuid,
    claimed_at     timestamptz,
    status         smallint,
    location       text,
    body           bytea,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (user_name, key)
);
-- Keys expire a day after first use; expired rows are deleted a few at a
-- time by the requests that claim new keys.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
