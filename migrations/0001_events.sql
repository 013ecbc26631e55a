-- The event log, in the shape postgres-es reads and writes. Events are never
-- updated or deleted; a change of shape adds a variant or an upcaster.
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

-- Aggregate snapshots, so that long-lived aggregates (nodes) load in
-- constant time.
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- The outbox gives the log its global order. Filled by trigger in the
-- event's own transaction. `position` is taken before commit, so a lower
-- position can become visible after a higher one: consumers only read rows
-- whose txid is older than every running transaction and order by
-- (txid, position). See DESIGN.md section 4.
CREATE TABLE outbox
(
    position       bigserial   PRIMARY KEY,
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_type     text        NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_order ON outbox (txid, position);
CREATE INDEX outbox_aggregate ON outbox (aggregate_type, aggregate_id, sequence);

CREATE FUNCTION events_to_outbox() RETURNS trigger LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO outbox (aggregate_type, aggregate_id, sequence, event_type)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.event_type);
    RETURN NEW;
END
$$;
CREATE TRIGGER events_to_outbox
    AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_to_outbox();

-- The log is append-only.
CREATE FUNCTION events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'events are immutable: % on events is not allowed', TG_OP;
END
$$;
CREATE TRIGGER events_are_immutable
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_immutable();

-- Where each outbox consumer has read to, as (txid, position).
CREATE TABLE checkpoints
(
    name     text   PRIMARY KEY,
    txid     bigint NOT NULL DEFAULT 0,
    position bigint NOT NULL DEFAULT 0
);

-- Unique names of nodes and projects. A claim is taken before the
-- aggregate's first event is written; a claim whose aggregate never came to
-- exist may be taken over.
CREATE TABLE name_claims
(
    kind         text NOT NULL,
    name         text NOT NULL,
    aggregate_id text NOT NULL,
    PRIMARY KEY (kind, name)
);
