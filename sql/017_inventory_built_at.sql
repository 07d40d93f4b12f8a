-- When a release's inventory was first written to Redis. A build after that (past the few
-- seconds a first build racing another takes: engine/recovery.py) is a rebuild: Redis lost
-- it, counted and alerted (GuichetInventoryRebuilt). A first build is not, however late it
-- comes: a release published while Redis did not answer is built once Redis is back (its
-- age alone called that a loss when Redis had been away over 30 s).
-- The releases published before this migration were built: '-infinity', long ago, given as
-- the column's default while it is added (kept in the catalogue, no row rewritten), then
-- dropped, so that a release published from now on has none until it is built.
SET LOCAL lock_timeout = '2s';
ALTER TABLE releases ADD COLUMN inventory_built_at timestamptz DEFAULT '-infinity';
ALTER TABLE releases ALTER COLUMN inventory_built_at DROP DEFAULT;
