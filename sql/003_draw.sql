-- Release by draw: a seed committed at publication, entries, and the draws run.

ALTER TABLE releases
    ADD COLUMN seed text,                -- hex, secret until the draw
    ADD COLUMN seed_commitment text,     -- SHA-256 of the seed, public from the start
    ADD COLUMN beacon text,              -- optional public value added after registration closes
    ADD COLUMN entries_digest text;      -- frozen when registration closes

-- Draw releases published before this migration get their seed now (gen_random_uuid is
-- PostgreSQL's own CSPRNG; two of them give 244 random bits).
UPDATE releases
SET seed = replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '')
WHERE mode = 'draw';
UPDATE releases SET seed_commitment = encode(sha256(convert_to(seed, 'UTF8')), 'hex')
WHERE mode = 'draw';
ALTER TABLE releases ADD CONSTRAINT draw_has_seed
    CHECK (mode <> 'draw' OR (seed IS NOT NULL AND seed_commitment IS NOT NULL));

CREATE TABLE entries (
    id               text PRIMARY KEY,
    release_id       text NOT NULL REFERENCES releases (id),
    procedure_id     text NOT NULL,
    digest           text NOT NULL UNIQUE,
    token_hash       bytea NOT NULL,
    identity_hash    bytea NOT NULL,
    email_hash       bytea NOT NULL,
    family_name      text NOT NULL,
    given_names      text NOT NULL,
    birth_date       date NOT NULL,
    client_net       text,
    status           text NOT NULL DEFAULT 'registered'
                         CHECK (status IN ('registered', 'won', 'not-drawn', 'withdrawn')),
    booking_reference text REFERENCES bookings (reference),
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'won') = (booking_reference IS NOT NULL))
);
-- One entry per person and release (a withdrawn one does not count).
CREATE UNIQUE INDEX entries_one_per_person ON entries (release_id, identity_hash)
    WHERE status <> 'withdrawn';
CREATE INDEX entries_by_release ON entries (release_id, status);
CREATE INDEX entries_by_booking ON entries (booking_reference) WHERE booking_reference IS NOT NULL;

CREATE TABLE draws (
    release_id  text PRIMARY KEY REFERENCES releases (id),
    record      jsonb NOT NULL,          -- the public record: GET /v1/releases/{id}/draw
    places      integer NOT NULL,
    allocated   integer NOT NULL,
    carried     integer NOT NULL,        -- places that came from earlier draws
    drawn_at    timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE bookings DROP CONSTRAINT bookings_channel_check;
ALTER TABLE bookings ADD CONSTRAINT bookings_channel_check
    CHECK (channel IN ('online', 'staff', 'draw'));
ALTER TABLE bookings ADD COLUMN entry_id text UNIQUE;
