-- Events an outbox consumer could not apply (a payload this version cannot
-- read, a constraint a read model refuses, a bug), one row per consumer
-- and event, so that one bad event stops neither its consumer nor the
-- others. A read model skips such an event, and, when it keeps state per
-- aggregate, the later events of that aggregate too (recorded here behind
-- it); it is inconsistent until `unidesk projections retry` or `rebuild`
-- clears its rows. Failures that may pass by themselves (a lost
-- connection) are retried and never recorded here.
CREATE TABLE dead_letters
(
    consumer       text        NOT NULL,
    position       bigint      NOT NULL,
    txid           bigint      NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_type     text        NOT NULL,
    -- Cut to a few KiB by the writer.
    error          text        NOT NULL,
    first_seen     timestamptz NOT NULL DEFAULT now(),
    last_seen      timestamptz NOT NULL DEFAULT now(),
    attempts       integer     NOT NULL DEFAULT 1,
    PRIMARY KEY (consumer, position)
);
CREATE INDEX dead_letters_aggregate ON dead_letters (consumer, aggregate_type, aggregate_id);

-- The database's size as the scheduler role last measured it against its
-- budget (`--db-budget-gb`), and whether task output is refused because of
-- it. One row.
CREATE TABLE storage_state
(
    id             boolean     PRIMARY KEY DEFAULT true CHECK (id),
    database_bytes bigint      NOT NULL DEFAULT 0,
    budget_bytes   bigint      NOT NULL DEFAULT 0,
    output_refused boolean     NOT NULL DEFAULT false,
    measured_at    timestamptz
);
INSERT INTO storage_state DEFAULT VALUES;

-- How many bytes of output each task holds in task_log, kept by trigger,
-- so the output budget is summed without reading the chunks.
CREATE TABLE task_log_usage
(
    task_id uuid        PRIMARY KEY,
    bytes   bigint      NOT NULL,
    last_at timestamptz NOT NULL
);
INSERT INTO task_log_usage (task_id, bytes, last_at)
SELECT task_id, sum(octet_length(data)), max(recorded_at) FROM task_log GROUP BY task_id;

-- Output that is not, or no longer, in task_log, and why: removed by
-- retention or the output budget (from offset 0, the whole attempt), or
-- refused from `from_offset` on while the database was over its budget.
CREATE TABLE task_log_removed
(
    task_id     uuid        NOT NULL,
    attempt     integer     NOT NULL,
    from_offset bigint      NOT NULL,
    reason      text        NOT NULL CHECK (reason IN ('retention', 'log_budget', 'db_budget')),
    removed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt)
);

-- While storage_state says so, new output is refused with SQLSTATE UD001
-- (the ingress tells the agent, for good); events are never refused.
CREATE FUNCTION task_log_admit() RETURNS trigger LANGUAGE plpgsql AS
$$
BEGIN
    IF (SELECT output_refused FROM storage_state) THEN
        RAISE EXCEPTION 'task output is refused: the database is over its size budget'
            USING ERRCODE = 'UD001';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER task_log_admit
    BEFORE INSERT ON task_log
    FOR EACH ROW EXECUTE FUNCTION task_log_admit();

-- After the row is in (a chunk sent twice is stored, and counted, once).
CREATE FUNCTION task_log_count() RETURNS trigger LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO task_log_usage (task_id, bytes, last_at)
    VALUES (NEW.task_id, octet_length(NEW.data), NEW.recorded_at)
    ON CONFLICT (task_id) DO UPDATE
        SET bytes = task_log_usage.bytes + EXCLUDED.bytes, last_at = EXCLUDED.last_at;
    RETURN NULL;
END
$$;
CREATE TRIGGER task_log_count
    AFTER INSERT ON task_log
    FOR EACH ROW EXECUTE FUNCTION task_log_count();
