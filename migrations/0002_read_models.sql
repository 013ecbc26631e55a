-- Read models, written only by the projector from the outbox and rebuilt
-- from the log at will (`unidesk projections rebuild`). Each row keeps the
-- sequence of the last event it reflects, so applying an event twice changes
-- nothing. `doc` holds the aggregate's state as JSON, exactly as the
-- aggregate itself computes it.

CREATE TABLE task_view
(
    id            uuid        PRIMARY KEY,
    project_id    uuid        NOT NULL,
    state         text        NOT NULL,
    priority      integer     NOT NULL,
    node_id       uuid,
    attempt       integer     NOT NULL,
    submitted_by  text        NOT NULL,
    submitted_at  timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    -- The outbox position of TaskSubmitted: the newest-first list order.
    list_position bigint      NOT NULL,
    last_sequence bigint      NOT NULL,
    doc           jsonb       NOT NULL
);
CREATE INDEX task_view_list ON task_view (list_position DESC);
CREATE INDEX task_view_project ON task_view (project_id, list_position DESC);
CREATE INDEX task_view_state ON task_view (state, list_position DESC);
CREATE INDEX task_view_node ON task_view (node_id, list_position DESC) WHERE node_id IS NOT NULL;
CREATE INDEX task_view_queue ON task_view (priority DESC, submitted_at, id) WHERE state = 'queued';

CREATE TABLE node_view
(
    id            uuid        PRIMARY KEY,
    name          text        NOT NULL,
    status        text        NOT NULL,
    drained       boolean     NOT NULL,
    provisioned_at timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    last_sequence bigint      NOT NULL,
    doc           jsonb       NOT NULL
);
CREATE INDEX node_view_name ON node_view (name);

CREATE TABLE project_view
(
    id            uuid        PRIMARY KEY,
    name          text        NOT NULL,
    archived      boolean     NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    last_sequence bigint      NOT NULL,
    doc           jsonb       NOT NULL
);

CREATE TABLE project_member_view
(
    project_id uuid NOT NULL,
    user_name  text NOT NULL,
    role       text NOT NULL,
    PRIMARY KEY (project_id, user_name)
);
CREATE INDEX project_member_view_user ON project_member_view (user_name);

CREATE TABLE user_view
(
    name          text        PRIMARY KEY,
    admin         boolean     NOT NULL,
    created_at    timestamptz NOT NULL,
    tokens        integer     NOT NULL,
    last_sequence bigint      NOT NULL
);

-- Every event with who, when and a one-line summary, for the audit timeline.
CREATE TABLE timeline
(
    position       bigint      PRIMARY KEY,
    txid           bigint      NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_type     text        NOT NULL,
    actor          text        NOT NULL,
    recorded_at    timestamptz NOT NULL,
    project_id     uuid,
    summary        text        NOT NULL
);
CREATE INDEX timeline_order ON timeline (txid DESC, position DESC);
CREATE INDEX timeline_aggregate ON timeline (aggregate_type, aggregate_id, sequence);
CREATE INDEX timeline_project ON timeline (project_id, txid DESC, position DESC);
CREATE INDEX timeline_type ON timeline (event_type, txid DESC, position DESC);
CREATE INDEX timeline_time ON timeline (recorded_at DESC);
