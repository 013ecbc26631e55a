-- A timeline page is always ordered by (txid, position), newest first, and
-- an aggregate's page is served by `timeline_aggregate_order` (0010).
-- `timeline_aggregate`, by sequence, from before pages had that order, no
-- longer serves any query; every event the projector and every rebuild
-- writes kept it up to date all the same.
DROP INDEX IF EXISTS timeline_aggregate;
