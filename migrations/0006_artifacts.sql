-- Finding the task of an artifact (GET /api/v1/artifacts/{id}/download):
-- artifact ids live in each task's state, `task_view.doc->'artifacts'`.
CREATE INDEX task_view_artifacts ON task_view USING gin ((doc -> 'artifacts') jsonb_path_ops);
