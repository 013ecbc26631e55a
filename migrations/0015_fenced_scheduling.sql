-- Fenced scheduling: the scheduler leader's lease and term, what attempts
-- hold on their nodes, and the ingresses' own liveness.
--
-- Like the auth tables of 0013, task_holds and gpu_holds are kept by a
-- trigger in the very transaction that appends a task's event, and the
-- backfill below rebuilds them from the log: they are not read models.

-- The scheduler leader's lease, one row. A standby takes the lead only when
-- the lease has expired (by the database's clock), bumping the term; the
-- leader renews it every few seconds. `term` is unique so that bumping it
-- is a key update: it waits for assignments in flight, which hold the row
-- FOR KEY SHARE, while renewals (no key update) never do.
CREATE TABLE scheduler_leader
(
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    term       bigint      NOT NULL UNIQUE,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL
);
INSERT INTO scheduler_leader (term, holder, expires_at) VALUES (0, '', 'epoch');

-- What each attempt holding a node reserves there: one row per task whose
-- current attempt is assigned, accepted, preparing or running.
CREATE TABLE task_holds
(
    task_id    uuid        PRIMARY KEY,
    attempt    integer     NOT NULL,
    node_id    uuid        NOT NULL,
    project_id uuid,
    millicpus  bigint      NOT NULL,
    memory_mb  bigint      NOT NULL,
    term       bigint,
    held_since timestamptz NOT NULL
);
CREATE INDEX task_holds_node ON task_holds (node_id);

-- Each GPU device held, by whom: never two attempts on one device.
CREATE TABLE gpu_holds
(
    node_id uuid    NOT NULL,
    gpu     integer NOT NULL,
    task_id uuid    NOT NULL REFERENCES task_holds (task_id) ON DELETE CASCADE,
    PRIMARY KEY (node_id, gpu)
);
CREATE INDEX gpu_holds_task ON gpu_holds (task_id);

-- Applies one task event to the holds. `TaskAssigned` reserves (after
-- checking the leader's term, the node's free GPU devices and, when the
-- assignment names the capacity it was made for, CPU and memory); every
-- event that ends an attempt lets its reservation go. With `restoring`
-- (the backfill below, `unidesk events import`) history is replayed as it
-- was: no fence, no checks, the first holder of a device keeps it.
--
-- Refusals raise SQLSTATE UDF01 (fenced: a stale or missing term) or UDR01
-- (not reserved), which the store turns into the task's refusal.
CREATE FUNCTION task_holds_apply(event_type text, aggregate_id text, payload json, restoring boolean)
    RETURNS void LANGUAGE plpgsql AS
$$
DECLARE
    body      json;
    spec      json;
    task      uuid := aggregate_id::uuid;
    node      uuid;
    given     bigint;
    leader    record;
    cpus      bigint;
    memory    bigint;
    devices   integer[];
    capacity  json;
    held_cpus bigint;
    held_mem  bigint;
    taken     record;
BEGIN
    IF event_type <> 'TaskAssigned' THEN
        DELETE FROM task_holds h WHERE h.task_id = task;
        RETURN;
    END IF;
    body := payload -> 'Assigned';
    node := (body ->> 'node_id')::uuid;
    given := (body ->> 'term')::bigint;
    IF NOT restoring THEN
        SELECT l.term, l.expires_at > clock_timestamp() AS live
        INTO leader FROM scheduler_leader l FOR KEY SHARE;
        IF given IS NULL AND leader.live THEN
            RAISE EXCEPTION USING ERRCODE = 'UDF01', MESSAGE = format(
                'the scheduler leader of term %s holds the lease: only its assignments are accepted',
                leader.term);
        ELSIF given IS NOT NULL AND (given <> leader.term OR NOT leader.live) THEN
            RAISE EXCEPTION USING ERRCODE = 'UDF01', MESSAGE = format(
                'term %s is no longer the scheduler leader''s (the current term is %s%s)',
                given, leader.term,
                CASE WHEN leader.live THEN '' ELSE ', its lease expired' END);
        END IF;
    END IF;
    SELECT e.payload -> 'Submitted' -> 'spec' INTO spec
    FROM events e
    WHERE e.aggregate_type = 'task' AND e.aggregate_id = task_holds_apply.aggregate_id
      AND e.event_type = 'TaskSubmitted';
    cpus := coalesce(round((spec -> 'resources' ->> 'cpus')::numeric * 1000), 0);
    memory := coalesce((spec -> 'resources' ->> 'memory_mb')::bigint, 0);
    devices := ARRAY(SELECT json_array_elements_text(coalesce(body -> 'gpus', '[]'::json))::integer);
    -- A new attempt replaces whatever an earlier one of the task held.
    DELETE FROM task_holds h WHERE h.task_id = task;
    IF NOT restoring THEN
        -- One reservation per node at a time, so the checks below hold.
        PERFORM pg_advisory_xact_lock(1433295174, hashtext(node::text));
        capacity := body -> 'capacity';
        IF capacity IS NOT NULL THEN
            SELECT coalesce(sum(h.millicpus), 0), coalesce(sum(h.memory_mb), 0)
            INTO held_cpus, held_mem FROM task_holds h WHERE h.node_id = node;
            IF held_cpus + cpus > (capacity ->> 'millicpus')::bigint THEN
                RAISE EXCEPTION USING ERRCODE = 'UDR01', MESSAGE = format(
                    'node %s has %s of %s millicpus held; the attempt needs %s more',
                    node, held_cpus, capacity ->> 'millicpus', cpus);
            END IF;
            IF held_mem + memory > (capacity ->> 'memory_mb')::bigint THEN
                RAISE EXCEPTION USING ERRCODE = 'UDR01', MESSAGE = format(
                    'node %s has %s of %s MiB of memory held; the attempt needs %s more',
                    node, held_mem, capacity ->> 'memory_mb', memory);
            END IF;
        END IF;
        SELECT g.gpu, g.task_id, h.attempt INTO taken
        FROM gpu_holds g JOIN task_holds h ON h.task_id = g.task_id
        WHERE g.node_id = node AND g.gpu = ANY (devices)
        ORDER BY g.gpu LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'UDR01', MESSAGE = format(
                'GPU %s of node %s is held by attempt %s of task %s',
                taken.gpu, node, taken.attempt, taken.task_id);
        END IF;
    END IF;
    INSERT INTO task_holds (task_id, attempt, node_id, project_id, millicpus, memory_mb, term, held_since)
    VALUES (task, (body ->> 'attempt')::integer, node, (spec ->> 'project_id')::uuid, cpus, memory,
            given, (body ->> 'at')::timestamptz);
    IF restoring THEN
        INSERT INTO gpu_holds (node_id, gpu, task_id)
        SELECT node, d, task FROM unnest(devices) AS d
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO gpu_holds (node_id, gpu, task_id)
        SELECT node, d, task FROM unnest(devices) AS d;
    END IF;
END
$$;

CREATE FUNCTION events_to_task_holds() RETURNS trigger LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM task_holds_apply(NEW.event_type, NEW.aggregate_id, NEW.payload,
                             coalesce(current_setting('unidesk.restoring', true), '') = 'on');
    RETURN NEW;
END
$$;
-- Before the row is written: a fenced assignment is refused before it can
-- conflict with anything.
CREATE TRIGGER events_to_task_holds
    BEFORE INSERT ON events
    FOR EACH ROW
    WHEN (NEW.aggregate_type = 'task' AND NEW.event_type IN
          ('TaskAssigned', 'TaskSucceeded', 'TaskFailed', 'TaskTimedOut', 'TaskCancelled', 'TaskLost'))
    EXECUTE FUNCTION events_to_task_holds();

-- The holds of the attempts already in the log: each task's last
-- assignment that nothing ended since. Where old logs had two attempts on
-- one GPU device, one of them keeps it.
DO
$$
DECLARE
    e record;
BEGIN
    FOR e IN
        SELECT a.event_type, a.aggregate_id, a.payload FROM events a
        WHERE a.aggregate_type = 'task' AND a.event_type = 'TaskAssigned'
          AND NOT EXISTS (
              SELECT 1 FROM events b
              WHERE b.aggregate_type = 'task' AND b.aggregate_id = a.aggregate_id
                AND b.sequence > a.sequence
                AND b.event_type IN ('TaskAssigned', 'TaskSucceeded', 'TaskFailed', 'TaskTimedOut',
                                     'TaskCancelled', 'TaskLost'))
        ORDER BY a.aggregate_id
    LOOP
        PERFORM task_holds_apply(e.event_type, e.aggregate_id, e.payload, true);
    END LOOP;
END
$$;

-- Each ingress process records that it is alive every few seconds.
-- `alive_since` is when its current unbroken run of records began: the
-- platform can hear nodes through it since then, and the scheduler counts
-- a node's silence from no earlier.
CREATE TABLE ingress_liveness
(
    ingress     text        PRIMARY KEY,
    alive_since timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL
);
