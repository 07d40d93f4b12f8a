-- version: 5
-- book_hold: a confirm's whole PostgreSQL step, in one round trip.
--
-- Applied by `guichet migrate` after the numbered migrations, and again when the version
-- above rises (engine/migrate.py): change book_hold here, and raise its version. Its earlier versions are in
-- sql/004_book.sql (why one function: one round trip instead of ten), 005, 006 and 008 (how
-- its plans stay on the indexes) and 010 (appointments that are over no longer count),
-- whose headers say why each part is as it is; in short:
-- - Called as one statement, it is one transaction; the trigger and the CHECK on slots still
--   refuse an overbooking, and a constraint violation aborts it with the constraint's name.
-- - outcome: 'booked' (a new booking), 'existing' (this hold was booked before: a retry),
--   'identity-bookings' or 'identity-cancellations' (the identity's cap over the period:
--   limit_count of them, the oldest leaving the period in wait_s seconds), 'email' (the
--   email's active bookings: limit_count). The booking's columns are filled for 'booked' and
--   'existing', in the order of engine.models.Booking.
-- - Its plans are kept (plan_cache_mode = auto) and can only read bookings through the
--   indexes made for them (enable_seqscan off; the email cap's predicate matches one index
--   only): tests/test_migrations.py fills the table after the plans are made and checks
--   that a confirm reads a handful of index entries.
-- - "Active" is confirmed, not retired, and not over: the person's appointments of the
--   procedure that are over, and their email address's when at its cap, are retired here,
--   under their locks, before the counts (sql/010_past_appointments.sql).
-- - Its caps are counted under a lock every confirm shares and a draw takes alone to count
--   them again, its winners booked (docs/draw.md, step 8).
-- - The hold is looked up again once the person's locks are taken (version 4): a second
--   call for the same hold (a retry, its first call still running or timed out) that waited
--   there for the first to commit must answer 'existing', not count the first's booking
--   against the person's caps and refuse it.
-- - A person who still has an active booking for the procedure is refused for it before
--   the caps are counted (version 5): told to retry in weeks (a cap's 429), they were not
--   told they hold a booking already. The refusal is the unique index's own violation,
--   which every engine version reads as identity-already-booked.
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
    v_unretired bigint;
BEGIN
    SELECT b.reference INTO v_reference FROM bookings b WHERE b.hold_id = p_hold_id;
    IF v_reference IS NULL THEN
        -- Shared with every confirm, taken alone by a draw to count the caps again, its
        -- winners booked, and commit: that count sees every booking that counted without
        -- them, and a confirm that waits counts them (engine/store.py, Store.run_draw).
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('booking-caps', 0));
        -- The locks serialise the confirms of one identity, and of one email, so that two
        -- concurrent ones cannot both pass the caps.
        PERFORM pg_advisory_xact_lock(
            ('x' || substr(encode(p_identity_hash, 'hex'), 1, 15))::bit(60)::bigint);
        PERFORM pg_advisory_xact_lock(
            ('x' || substr(encode(p_email_hash, 'hex'), 1, 15))::bit(60)::bigint);
        -- A statement's own snapshot: a call for this hold that held the locks has committed.
        SELECT b.reference INTO v_reference FROM bookings b WHERE b.hold_id = p_hold_id;
    END IF;
    IF v_reference IS NULL THEN
        -- A booking the prefecture cancelled counts toward neither cap (sql/013), and is
        -- not confirmed, so the last count does not miss it either.
        SELECT count(*) FILTER (WHERE b.created_at > now() - p_period),
               min(b.created_at) FILTER (WHERE b.created_at > now() - p_period),
               count(*) FILTER (WHERE b.cancelled_at > now() - p_period),
               min(b.cancelled_at) FILTER (WHERE b.cancelled_at > now() - p_period),
               count(*) FILTER (WHERE b.procedure_id = p_procedure_id
                                  AND b.status = 'confirmed' AND b.retired_at IS NULL)
          INTO v_booked, v_first, v_cancelled, v_first_cancelled, v_unretired
          FROM bookings b
         WHERE b.identity_hash = p_identity_hash
           AND b.cancelled_by IS DISTINCT FROM 'prefecture';
        IF v_unretired > 0 THEN
            -- This person's appointments of the procedure that are over no longer count
            -- (header). Only asked when they have one not retired: most people have none.
            UPDATE bookings b SET retired_at = now()
             WHERE b.procedure_id = p_procedure_id AND b.identity_hash = p_identity_hash
               AND b.status = 'confirmed' AND b.retired_at IS NULL
               AND (SELECT s.starts_at + make_interval(mins => s.duration_minutes)
                      FROM slots s WHERE s.id = b.slot_id) <= now();
            -- As the insert would (header): this first, the caps' refusals after it. Read
            -- again, by the unique index's own condition: a cancel or the purge, which take
            -- no lock of this person's, may have changed the rows since the count.
            IF EXISTS (SELECT 1 FROM bookings b
                        WHERE b.procedure_id = p_procedure_id
                          AND b.identity_hash = p_identity_hash
                          AND b.status = 'confirmed' AND b.retired_at IS NULL) THEN
                RAISE EXCEPTION 'the person already has an active booking for this procedure'
                    USING ERRCODE = 'unique_violation',
                          CONSTRAINT = 'bookings_one_active_per_identity';
            END IF;
        END IF;
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
        -- Through bookings_active_by_email alone, by the plan kept (008's header): this
        -- address's bookings not retired. At the cap, those over are retired (header) and
        -- the rest counted again: only then is it worth the statements. (Again, rather than
        -- less the rows retired: the purge may have taken one of them meanwhile, sql/011.)
        SELECT count(*) INTO limit_count FROM bookings b
         WHERE b.email_hash = p_email_hash AND b.cancelled_at IS NULL AND b.retired_at IS NULL;
        IF limit_count >= p_max_active_per_email THEN
            UPDATE bookings b SET retired_at = now()
             WHERE b.email_hash = p_email_hash AND b.cancelled_at IS NULL
               AND b.retired_at IS NULL
               AND (SELECT s.starts_at + make_interval(mins => s.duration_minutes)
                      FROM slots s WHERE s.id = b.slot_id) <= now();
            SELECT count(*) INTO limit_count FROM bookings b
             WHERE b.email_hash = p_email_hash AND b.cancelled_at IS NULL
               AND b.retired_at IS NULL;
        END IF;
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
