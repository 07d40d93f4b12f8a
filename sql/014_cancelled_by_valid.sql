-- 013's check, validated: it reads every booking (all NULL before 013) under a lock that
-- lets reads and writes of bookings go on (SHARE UPDATE EXCLUSIVE), in a transaction of its
-- own, so that 013's exclusive lock was held only for an instant.
ALTER TABLE bookings VALIDATE CONSTRAINT bookings_cancelled_by;
