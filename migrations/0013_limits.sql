-- What authentication needs to know about user tokens, kept current by a
-- trigger on the event log in the very transaction that appends the user's
-- event: a token works at the next request after it was issued and stops
-- at once when revoked, on every replica, and a request with an unknown,
-- wrong, revoked or expired token is refused after one lookup by primary
-- key, without loading the user's aggregate. These are not read models of
-- the projector (rebuilding projections leaves them alone): the events
-- stay the source of truth, and the backfill below is the rebuild.

-- Users and whether they administer the platform.
CREATE TABLE auth_users
(
    name  text    PRIMARY KEY,
    admin boolean NOT NULL
);

-- Every token ever issued, by id; only the SHA-256 of its secret is kept.
CREATE TABLE auth_tokens
(
    token_id    uuid        PRIMARY KEY,
    user_name   text        NOT NULL,
    fingerprint text        NOT NULL,
    label       text        NOT NULL DEFAULT '',
    issued_at   timestamptz NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz
);
-- A user's tokens in the order they were issued (token ids are UUIDv7).
CREATE INDEX auth_tokens_user ON auth_tokens (user_name, token_id);

-- Applies one user event to the tables above. Events are written by the
-- User aggregate, externally tagged: {"TokenIssued": {...}}.
CREATE FUNCTION auth_apply(event_type text, aggregate_id text, payload json)
    RETURNS void LANGUAGE plpgsql AS
$$
DECLARE
    body json;
BEGIN
    IF event_type = 'UserCreated' THEN
        body := payload -> 'Created';
        INSERT INTO auth_users (name, admin)
        VALUES (aggregate_id, coalesce((body ->> 'admin')::boolean, false))
        ON CONFLICT (name) DO UPDATE SET admin = excluded.admin;
    ELSIF event_type = 'UserTokenIssued' THEN
        body := payload -> 'TokenIssued';
        INSERT INTO auth_tokens (token_id, user_name, fingerprint, label, issued_at, expires_at)
        VALUES ((body ->> 'token_id')::uuid, aggregate_id, body ->> 'fingerprint',
                coalesce(body ->> 'label', ''), (body ->> 'at')::timestamptz,
                (body ->> 'expires_at')::timestamptz)
        ON CONFLICT (token_id) DO NOTHING;
    ELSIF event_type = 'UserTokenRevoked' THEN
        body := payload -> 'TokenRevoked';
        UPDATE auth_tokens SET revoked_at = (body ->> 'at')::timestamptz
        WHERE token_id = (body ->> 'token_id')::uuid
          AND user_name = aggregate_id
          AND revoked_at IS NULL;
    END IF;
END
$$;

CREATE FUNCTION events_to_auth() RETURNS trigger LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM auth_apply(NEW.event_type, NEW.aggregate_id, NEW.payload);
    RETURN NEW;
END
$$;
CREATE TRIGGER events_to_auth
    AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.aggregate_type = 'user')
    EXECUTE FUNCTION events_to_auth();

-- The users and tokens already in the log, in the log's order.
SELECT auth_apply(event_type, aggregate_id, payload)
FROM events
WHERE aggregate_type = 'user'
ORDER BY aggregate_id, sequence;

-- Lists are read a page at a time in (name, id) order.
CREATE INDEX node_view_page ON node_view (name, id);
CREATE INDEX project_view_page ON project_view (name, id);
