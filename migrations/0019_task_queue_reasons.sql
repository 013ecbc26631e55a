-- Why each queued task waits, as the leading scheduler last explained it
-- (store::queue_reasons). Not events: only a changed explanation is
-- written, and a row goes when its task leaves the queue. `attempt` is the
-- attempt the task waits after (0 before its first), so a row is shown
-- only while the task is still queued after that attempt; `term` is the
-- leader's that wrote it, so a deposed leader cannot overwrite its
-- successor's rows.
CREATE TABLE task_queue_reasons
(
    task_id    uuid        PRIMARY KEY,
    attempt    integer     NOT NULL,
    term       bigint      NOT NULL,
    reason     jsonb       NOT NULL,
    since      timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
