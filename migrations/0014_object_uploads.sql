-- Uploads into a project's object store through the API, and the objects
-- they verified.
--
-- These are not events: an upload lives for minutes, most of its life is
-- bookkeeping between the API, the store and the sweeper (claims, leases),
-- and nothing is ever rebuilt from it. The rows themselves are the record
-- of who uploaded what and how each upload ended.

-- One row per upload started with POST /projects/{id}/objects.
--
-- state: pending     URLs handed out, waiting for the completion
--        completing  a completion (`claim`) is assembling or reading it back
--                    until `lease_until`, renewing the lease while it reads
--        verified    the stored object matched the declared size and SHA-256
--        rejected    it did not (`detail` says how); the object was deleted
--        aborting    the sweeper (`claim`) is aborting it in the store
--        aborted     abandoned: not completed before its URLs expired plus a
--                    grace; its multipart upload was aborted in the store
CREATE TABLE object_uploads
(
    id          uuid        PRIMARY KEY,
    project_id  uuid        NOT NULL,
    name        text        NOT NULL,
    size        bigint      NOT NULL CHECK (size >= 0),
    sha256      text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    method      text        NOT NULL CHECK (method IN ('put', 'multipart')),
    -- What the client names in the completion: the store's multipart upload
    -- id, or for a single PUT the row's own id.
    upload_id   text        NOT NULL,
    started_by  text        NOT NULL,
    started_at  timestamptz NOT NULL,
    -- When the URLs handed out expire.
    expires_at  timestamptz NOT NULL,
    state       text        NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'completing', 'verified', 'rejected',
                                 'aborting', 'aborted')),
    claim       uuid,
    lease_until timestamptz,
    finished_at timestamptz,
    detail      text,
    UNIQUE (project_id, upload_id)
);

-- The sweeper's question: which unfinished uploads expired?
CREATE INDEX object_uploads_unfinished ON object_uploads (expires_at)
    WHERE state IN ('pending', 'completing', 'aborting');

-- The objects a task may use as inputs: the latest verified upload of each
-- name. A row goes when the object is deleted (a later upload of the name
-- did not match).
CREATE TABLE project_objects
(
    project_id  uuid        NOT NULL,
    name        text        NOT NULL,
    size        bigint      NOT NULL CHECK (size >= 0),
    sha256      text        NOT NULL,
    upload      uuid        NOT NULL REFERENCES object_uploads (id),
    verified_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, name)
);
