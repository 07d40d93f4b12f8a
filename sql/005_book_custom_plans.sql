-- book_hold plans its queries afresh on every call.
--
-- PL/pgSQL keeps a generic plan of each query per connection once it has run five times,
-- and the engine's connections live long. A plan made while `bookings` was empty or never
-- analysed is wrong for a full table: the planner then sees every partial index on
-- "status = 'confirmed'" as equally cheap, and the email cap query scanned the confirmed
-- bookings through the client network index, all of them, at every confirm. In the
-- benchmark (a new database each run) confirms ran at 880/s or 2 900/s depending on whether
-- autovacuum analysed `bookings` before the connections made their plans (BENCHMARKS.md).
-- A custom plan costs some planning per call, and always sees the table as it is.
ALTER FUNCTION book_hold(
    text, text, text, text, text, text, bytea, bytea, bytea, text, text, date, bytea, text,
    interval, integer, integer, integer
) SET plan_cache_mode = force_custom_plan;
