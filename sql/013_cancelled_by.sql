-- Who cancelled a booking: the person ('person': online with their cancel token, or staff
-- for them at the counter or on the phone) or the prefecture ('prefecture': a closure, an
-- agent absent; DELETE /v1/admin/bookings/{reference}?by=prefecture).
--
-- A booking the prefecture cancelled counts toward neither of the person's caps over the
-- period (3 bookings, 2 cancellations: book_hold, sql/functions/book_hold.sql, and the
-- draw's, engine/store.py). Before, it counted as the person's own cancellation: two
-- appointments the prefecture called off kept the person from booking for 30 days.
-- NULL while the booking is confirmed, and on the cancellations made before this
-- migration, which were all counted as the person's (and still are).
-- Both statements are instant: a new column without a default rewrites nothing, and a
-- check NOT VALID reads no row (new rows are held to it at once). Checked inline, the
-- constraint would scan every booking under the table's exclusive lock, every booking
-- query waiting; 014 validates it under a lock that lets them run. A lock not granted
-- within 2 s fails the migration rather than queueing every booking query behind it.
SET LOCAL lock_timeout = '2s';
ALTER TABLE bookings ADD COLUMN cancelled_by text;
ALTER TABLE bookings ADD CONSTRAINT bookings_cancelled_by
    CHECK (cancelled_by IN ('person', 'prefecture')) NOT VALID;
-- Whether the cancel took the place off its slot (?place=withdraw): so that a staff cancel
-- sent again with other terms is told it changed nothing (409), rather than 204. A constant
-- default is kept in the catalog: instant too.
ALTER TABLE bookings ADD COLUMN place_withdrawn boolean NOT NULL DEFAULT false;
