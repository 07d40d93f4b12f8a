-- Where a draw's beacon will come from (docs/draw.md), said when the release is published:
-- "the EuroMillions draw of 2026-12-04", say. Public from then on, in the listing and in the
-- draw's record, and never changed: the beacon staff set later can then be checked against
-- a source named before anyone knew it, instead of being a value an insider who knows the
-- seed could choose.
-- Catalogue change only, alone in its migration: the table is locked for an instant.
SET LOCAL lock_timeout = '2s';
ALTER TABLE releases ADD COLUMN beacon_source text;
