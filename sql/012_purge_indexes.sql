-- The rows Store.purge looks at: those not purged yet, by creation time. A booking is made
-- before its appointment ends, but for minutes at most (a confirm can come a hold's
-- lifetime after a short slot ended; a worker's clock may lag PostgreSQL's), so a booking
-- whose appointment ended before the cutoff was, but for those minutes, made before it:
-- the purge reads the bookings made before the cutoff and not purged, checks each one's
-- appointment, and never purges early. It reads the ones to purge, and those booked
-- further ahead than the retention, again at each run. Entries likewise. Built under a lock that lets reads through (writes to the two tables
-- wait for the builds); a lock not granted within 2 s fails the migration.
SET LOCAL lock_timeout = '2s';
CREATE INDEX bookings_unpurged ON bookings (created_at) WHERE purged_at IS NULL;
CREATE INDEX entries_unpurged ON entries (created_at) WHERE purged_at IS NULL;
