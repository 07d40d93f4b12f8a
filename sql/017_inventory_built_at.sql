-- When a release's inventory was first written to Redis. A build after that (past the few
-- seconds a first build racing another takes: engine/recovery.py) is a rebuild: Redis lost
-- it, counted and alerted (GuichetInventoryRebuilt). A first build is not, however late it
-- comes: a release published while Redis did not answer is built once Redis is back (its
-- age alone called that a loss when Redis had been away over 30 s).
-- The engine publishes a release with none (NULL, written out), and records its first
-- build. The default, '-infinity' (long ago), is for every other row: the releases there
-- before this migration, and those an engine of before it publishes during a rolling
-- deploy, which never records a build. Kept in the catalogue: no row is rewritten.
SET LOCAL lock_timeout = '2s';
ALTER TABLE releases ADD COLUMN inventory_built_at timestamptz DEFAULT '-infinity';
