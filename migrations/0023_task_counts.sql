-- How many tasks each project has in each state, beside `task_view`: the
-- tasks read model writes both in the same statements, so they agree at
-- every commit, and `/metrics` reads one row per project and state instead
-- of counting every task ever run on each scrape. No row holds zero.
CREATE TABLE task_counts
(
    project_id uuid   NOT NULL,
    state      text   NOT NULL,
    tasks      bigint NOT NULL,
    PRIMARY KEY (project_id, state)
);

INSERT INTO task_counts (project_id, state, tasks)
SELECT project_id, state, count(*) FROM task_view GROUP BY project_id, state;
