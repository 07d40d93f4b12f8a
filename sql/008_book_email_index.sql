-- book_hold's email cap keeps its plan, which can only read the email index.
--
-- 006 ran the email cap query through EXECUTE, planned at every call: its predicate,
-- status = 'confirmed', is also the predicate of four other partial indexes, and a plan
-- made while `bookings` was empty could pick one of them and read every confirmed booking
-- at each confirm. Planning it was a fifth of PostgreSQL's work per confirm: a loop of
-- book_hold calls on 8 connections cost PostgreSQL 0.37 - 0.40 ms of CPU per call before
-- this migration, 0.27 - 0.29 ms after it; 3 300 - 3 540 calls a second before, 4 180 -
-- 4 370 after (BENCHMARKS.md, sixth session).
-- Here the email index covers the rows with cancelled_at IS NULL, which are exactly the
-- confirmed ones (bookings' CHECK ties status = 'cancelled' to cancelled_at), and the query
-- asks for those. No other index of bookings has a predicate that query implies, or a
-- leading column it constrains, so a plan can only read this index or the table, and
-- enable_seqscan is off within book_hold. tests/test_migrations.py fills the table after
-- the plans are made and checks that a confirm reads a handful of index entries.
-- The rest of book_hold is 006's, unchanged (CREATE OR REPLACE restates it whole).
-- The new index is built before the old one is dropped: writes to bookings wait for the
-- build (0.27 s for 373 000 bookings), reads do not. A lock this migration cannot get
-- within 2 s (a draw's transaction, say) fails it rather than queueing every booking query
-- behind it; `guichet migrate` then fails, and is run again (guichet.service restarts it).
SET LOCAL lock_timeout = '2s';
CREATE INDEX bookings_active_by_email_new ON bookings (email_hash) WHERE cancelled_at IS NULL;
DROP INDEX bookings_active_by_email;
ALTER INDEX bookings_active_by_email_new RENAME TO bookings_active_by_email;

CREATE OR REPLACE FUNCTION book_hold(
    p_reference text, p_slot_id text, p_release_id text, p_procedure_id text,
    p_channel text, p_hold_id text, p_hold_token_hash bytea, p_identity_hash bytea,
    p_email_hash bytea, p_family_name text, p_given_names text, p_birth_date date,
    p_cancel_token_hash bytea, p_client_net text,
    p_period interval, p_max_bookings integer, p_max_cancellations integer,
    p_max_active_per_email integer,
    OUT reference text, OUT status text, OUT release_id text, OUT slot_id text,
    OUT starts_at timestamptz, OUT duration_minutes integer, OUT family_name text,
    OUT given_names text, OUT birth_date date, OUT channel text, OUT hold_token_hash bytea,
    OUT cancel_token_hash bytea, OUT mode text, OUT timezone text,
    OUT outcome text, OUT limit_count bigint, OUT wait_s double precision
) LANGUAGE plpgsql
SET plan_cache_mode = auto
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_reference text;
    v_first timestamptz;
    v_first_cancelled timestamptz;
    v_booked bigint;
    v_cancelled bigint;
BEGIN
    SELECT b.reference INTO v_reference FROM bookings b WHERE b.hold_id = p_hold_id;
    IF v_reference IS NULL THEN
        -- The locks serialise the confirms of one identity, and of one email, so that two
        -- concurrent ones cannot both pass the caps.
        PERFORM pg_advisory_xact_lock(
            ('x' || substr(encode(p_identity_hash, 'hex'), 1, 15))::bit(60)::bigint);
        PERFORM pg_advisory_xact_lock(
            ('x' || substr(encode(p_email_hash, 'hex'), 1, 15))::bit(60)::bigint);
        SELECT count(*) FILTER (WHERE b.created_at > now() - p_period),
               min(b.created_at) FILTER (WHERE b.created_at > now() - p_period),
               count(*) FILTER (WHERE b.cancelled_at > now() - p_period),
               min(b.cancelled_at) FILTER (WHERE b.cancelled_at > now() - p_period)
          INTO v_booked, v_first, v_cancelled, v_first_cancelled
          FROM bookings b WHERE b.identity_hash = p_identity_hash;
        IF v_booked >= p_max_bookings THEN
            outcome := 'identity-bookings';
            limit_count := v_booked;
            wait_s := extract(epoch FROM v_first + p_period - now());
            RETURN;
        END IF;
        IF v_cancelled >= p_max_cancellations THEN
            outcome := 'identity-cancellations';
            limit_count := v_cancelled;
            wait_s := extract(epoch FROM v_first_cancelled + p_period - now());
            RETURN;
        END IF;
        -- Through bookings_active_by_email alone, by the plan kept (header).
        SELECT count(*) INTO limit_count FROM bookings b
         WHERE b.email_hash = p_email_hash AND b.cancelled_at IS NULL;
        IF limit_count >= p_max_active_per_email THEN
            outcome := 'email';
            RETURN;
        END IF;
        limit_count := NULL;
        INSERT INTO bookings (reference, slot_id, release_id, procedure_id, channel, hold_id,
                              hold_token_hash, identity_hash, email_hash, family_name,
                              given_names, birth_date, cancel_token_hash, client_net)
        VALUES (p_reference, p_slot_id, p_release_id, p_procedure_id, p_channel, p_hold_id,
                p_hold_token_hash, p_identity_hash, p_email_hash, p_family_name,
                p_given_names, p_birth_date, p_cancel_token_hash, p_client_net)
        ON CONFLICT (hold_id) DO NOTHING
        RETURNING bookings.reference INTO v_reference;
        IF v_reference IS NOT NULL THEN
            outcome := 'booked';
            INSERT INTO audit_log (actor, action, subject, detail)
            VALUES (p_channel, 'booking.confirm', v_reference,
                    jsonb_build_object('slot', p_slot_id, 'hold', p_hold_id));
        ELSE
            -- A concurrent retry of this confirm inserted first.
            SELECT b.reference INTO v_reference FROM bookings b WHERE b.hold_id = p_hold_id;
        END IF;
    END IF;
    outcome := coalesce(outcome, 'existing');
    SELECT b.reference, b.status, b.release_id, b.slot_id, s.starts_at, s.duration_minutes,
           b.family_name, b.given_names, b.birth_date, b.channel, b.hold_token_hash,
           b.cancel_token_hash, r.mode, st.timezone
      INTO reference, status, release_id, slot_id, starts_at, duration_minutes, family_name,
           given_names, birth_date, channel, hold_token_hash, cancel_token_hash, mode,
           timezone
      FROM bookings b JOIN slots s ON s.id = b.slot_id
      JOIN releases r ON r.id = b.release_id JOIN sites st ON st.id = r.site_id
     WHERE b.reference = v_reference;
END $$;
