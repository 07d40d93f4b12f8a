-- Personal data is kept GUICHET_RETENTION_DAYS after an appointment, then erased.
--
-- A booking holds a person's names and birth date in clear (for the counter staff) and
-- keyed hashes of their document number and email (for the identity rules); a draw entry
-- the same. Once the appointment is long over none of it serves any more, and keeping it
-- would only keep the foreign residents' data at risk. Store.purge (run by the sweeper, and
-- by `guichet sweep`) empties the names, drops the birth date and the client network, and
-- replaces the hashes by hashes of the row's own key, so that nothing links the row to a
-- person; it sets purged_at. The booking itself stays (its reference, slot, status and
-- times), counted in its slot as before, and reads as a confirmed or cancelled booking with
-- empty names. 012 adds the indexes the purge finds its rows by.
-- Catalogue changes only, alone in their migration: the tables are locked for an instant.
SET LOCAL lock_timeout = '2s';
ALTER TABLE bookings ADD COLUMN purged_at timestamptz, ALTER COLUMN birth_date DROP NOT NULL;
ALTER TABLE entries ADD COLUMN purged_at timestamptz, ALTER COLUMN birth_date DROP NOT NULL;
