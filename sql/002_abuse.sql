-- Abuse resistance: identity and email caps look up recent bookings, and each online
-- booking keeps the client's network (IPv4 /24, IPv6 /64) for fairness figures.

ALTER TABLE bookings ADD COLUMN client_net text;

CREATE INDEX bookings_by_identity ON bookings (identity_hash, created_at);
CREATE INDEX bookings_cancelled_by_identity ON bookings (identity_hash, cancelled_at)
    WHERE status = 'cancelled';
CREATE INDEX bookings_active_by_email ON bookings (email_hash) WHERE status = 'confirmed';
CREATE INDEX bookings_active_by_net ON bookings (client_net) WHERE status = 'confirmed';
