-- Bookings get retired_at: the moment an appointment that was over stopped counting as its
-- person's active booking (sql/010_past_appointments.sql says why and how).
-- Alone in its migration: ADD COLUMN locks the table against reads and writes until its
-- transaction commits, and here that is at once (a nullable column without a default only
-- changes the catalogue). 010 then builds its indexes under a lock that lets reads through.
SET LOCAL lock_timeout = '2s';
ALTER TABLE bookings ADD COLUMN retired_at timestamptz;
