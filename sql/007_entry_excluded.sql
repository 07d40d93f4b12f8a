-- An entry the draw excluded (its person had booked the procedure otherwise before the draw)
-- reads "withdrawn", one of API.md's statuses, with "excluded": true, so that its person can
-- tell it from a withdrawal they never made. The flag is kept on the entry: reading it from
-- the draw record meant loading the whole record (every entry digest of the draw) at each
-- look at an entry. Draws already run are read once, here.
ALTER TABLE entries ADD COLUMN excluded boolean NOT NULL DEFAULT false;
UPDATE entries e SET excluded = true
  FROM draws d
 WHERE d.release_id = e.release_id
   AND e.status = 'withdrawn'
   AND d.record -> 'excluded' ? e.digest;
