-- The rows Store.purge looks at: those not purged yet, by creation time. An appointment
-- ends after its booking was made, so a booking whose appointment ended before the cutoff
-- was created before it too: each run reads the bookings created before the cutoff and not
-- purged, which are the ones to purge and the few booked further ahead than the retention.
-- Entries likewise. Built under a lock that lets reads through (writes to the two tables
-- wait for the builds); a lock not granted within 2 s fails the migration.
SET LOCAL lock_timeout = '2s';
CREATE INDEX bookings_unpurged ON bookings (created_at) WHERE purged_at IS NULL;
CREATE INDEX entries_unpurged ON entries (created_at) WHERE purged_at IS NULL;
