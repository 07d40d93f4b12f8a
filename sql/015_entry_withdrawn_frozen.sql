-- API.md: a person may withdraw their entry "before the draw". Registration's close freezes
-- the entry list: its digest is recorded then (Store.freeze_entries), and the draw's record
-- lists those entries. An entry withdrawn between the close and the draw therefore stays in
-- the draw's entries, and the draw passes it over, as it passes over an excluded one
-- (docs/draw.md, step 8). This flag marks such an entry: withdrawn by its person after the
-- freeze. An entry withdrawn before it is in no draw, as before.
-- Catalogue change only, alone in its migration: the table is locked for an instant.
SET LOCAL lock_timeout = '2s';
ALTER TABLE entries ADD COLUMN withdrawn_frozen boolean NOT NULL DEFAULT false;
