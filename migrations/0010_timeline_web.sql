-- The web timeline filters by node and pages newest first under every
-- filter. A node's timeline is its own events and the task events that
-- name it (assigned to it, lost on it), so the timeline keeps the node an
-- event concerns. Measured with 100,000 events (BENCHMARKS.md, "Web view"):
-- each filter below reads one page through an index, in under a millisecond.

ALTER TABLE timeline ADD COLUMN node_id uuid;

-- Rows projected before this migration: nodes' own events, and the task
-- events that name a node.
UPDATE timeline SET node_id = aggregate_id::uuid WHERE aggregate_type = 'node';
UPDATE timeline t
SET node_id = COALESCE(e.payload -> 'Assigned' ->> 'node_id', e.payload -> 'Lost' ->> 'node_id')::uuid
FROM events e
WHERE t.aggregate_type = 'task'
  AND t.event_type IN ('TaskAssigned', 'TaskLost')
  AND e.aggregate_type = t.aggregate_type
  AND e.aggregate_id = t.aggregate_id
  AND e.sequence = t.sequence;

CREATE INDEX timeline_node ON timeline (node_id, txid DESC, position DESC) WHERE node_id IS NOT NULL;

-- One aggregate's events newest first (a task's or a project's page).
CREATE INDEX timeline_aggregate_order ON timeline (aggregate_type, aggregate_id, txid DESC, position DESC);
