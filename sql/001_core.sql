-- guichet core schema: sites, procedures, releases, slots, bookings, audit log.
-- PostgreSQL is the truth; its constraints are the last guard against overbooking.

CREATE TABLE sites (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    timezone    text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE procedures (
    site_id  text NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    id       text NOT NULL,
    name     text NOT NULL,
    PRIMARY KEY (site_id, id)
);

CREATE TABLE releases (
    id                      text PRIMARY KEY,
    site_id                 text NOT NULL,
    procedure_id            text NOT NULL,
    mode                    text NOT NULL CHECK (mode IN ('fcfs', 'draw')),
    opens_at                timestamptz,
    registration_opens_at   timestamptz,
    registration_closes_at  timestamptz,
    draw_at                 timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (site_id, procedure_id) REFERENCES procedures (site_id, id),
    CONSTRAINT release_windows CHECK (
        (mode = 'fcfs' AND opens_at IS NOT NULL AND registration_opens_at IS NULL
            AND registration_closes_at IS NULL AND draw_at IS NULL)
        OR (mode = 'draw' AND opens_at IS NULL
            AND registration_opens_at < registration_closes_at
            AND registration_closes_at <= draw_at))
);
CREATE INDEX releases_by_site ON releases (site_id, procedure_id);

CREATE TABLE slots (
    id                text PRIMARY KEY,
    release_id        text NOT NULL REFERENCES releases (id) ON DELETE CASCADE,
    starts_at         timestamptz NOT NULL,
    duration_minutes  integer NOT NULL CHECK (duration_minutes BETWEEN 1 AND 1440),
    capacity          integer NOT NULL CHECK (capacity BETWEEN 0 AND 10000),
    -- Maintained by the bookings trigger below, never by application code.
    booked            integer NOT NULL DEFAULT 0,
    CONSTRAINT slot_not_overbooked CHECK (booked >= 0 AND booked <= capacity)
);
CREATE INDEX slots_by_release ON slots (release_id, starts_at);

CREATE TABLE bookings (
    reference          text PRIMARY KEY,
    slot_id            text NOT NULL REFERENCES slots (id),
    release_id         text NOT NULL REFERENCES releases (id),
    procedure_id       text NOT NULL,
    channel            text NOT NULL CHECK (channel IN ('online', 'staff')),
    -- One booking per hold (staff bookings use a hold too): a confirm retried after a
    -- crash finds the first one.
    hold_id            text UNIQUE,
    hold_token_hash    bytea,
    identity_hash      bytea NOT NULL,
    email_hash         bytea NOT NULL,
    family_name        text NOT NULL,
    given_names        text NOT NULL,
    birth_date         date NOT NULL,
    cancel_token_hash  bytea NOT NULL,
    status             text NOT NULL DEFAULT 'confirmed'
                           CHECK (status IN ('confirmed', 'cancelled')),
    created_at         timestamptz NOT NULL DEFAULT now(),
    cancelled_at       timestamptz,
    CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL)),
    CHECK (channel <> 'online' OR hold_id IS NOT NULL)
);
-- One active booking per person and procedure (procedure ids are shared across sites).
CREATE UNIQUE INDEX bookings_one_active_per_identity
    ON bookings (procedure_id, identity_hash) WHERE status = 'confirmed';
CREATE INDEX bookings_active_by_slot ON bookings (slot_id) WHERE status = 'confirmed';
CREATE INDEX bookings_active_by_release ON bookings (release_id) WHERE status = 'confirmed';

-- slots.booked is the count of confirmed bookings, kept by this trigger in the same
-- transaction, so the slot_not_overbooked constraint guards every path that books.
CREATE FUNCTION bookings_count_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND NEW.status = 'confirmed' THEN
        UPDATE slots SET booked = booked + 1 WHERE id = NEW.slot_id;
    ELSIF TG_OP = 'UPDATE' AND OLD.status = 'confirmed' AND NEW.status = 'cancelled' THEN
        UPDATE slots SET booked = booked - 1 WHERE id = NEW.slot_id;
    ELSIF TG_OP = 'UPDATE' AND OLD.status <> NEW.status THEN
        RAISE EXCEPTION 'a booking cannot go from % to %', OLD.status, NEW.status;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER bookings_count_slot AFTER INSERT OR UPDATE OF status ON bookings
    FOR EACH ROW EXECUTE FUNCTION bookings_count_slot();

CREATE TABLE audit_log (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    action   text NOT NULL,
    subject  text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_by_subject ON audit_log (subject, at);
