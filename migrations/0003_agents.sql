-- Liveness of node agents. Heartbeats are not events (thousands of nodes
-- beating every 15 s would drown the log): they update this row. Only
-- changes of state (connected, disconnected, marked offline) are events.
CREATE TABLE node_liveness
(
    node_id      uuid        PRIMARY KEY,
    session      uuid        NOT NULL,
    ingress      text        NOT NULL,
    connected_at timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL
);

-- What each node reported it has cached, so the scheduler can prefer a
-- node that already holds a task's image or commit.
CREATE TABLE node_cache
(
    node_id    uuid        PRIMARY KEY,
    images     text[]      NOT NULL DEFAULT '{}',
    commits    text[]      NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Task output in chunks, keyed by byte offset so a chunk sent twice is
-- stored once and a reader can resume from any offset.
CREATE TABLE task_log
(
    task_id     uuid        NOT NULL,
    attempt     integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    data        text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt, "offset")
);
