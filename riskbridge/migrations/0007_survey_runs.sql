-- riskbridge ledger, schema version 7: runs of kind `survey` (`riskbridge survey`, docs/units.md "Surveying a site's
-- feeds").
--
-- A survey run takes discover and match over a window to find the cohort whose lab and note feeds it samples; it
-- retrieves, scores and writes nothing, and it covers nothing.

ALTER TABLE runs DROP CONSTRAINT runs_kind_check;
ALTER TABLE runs ADD CONSTRAINT runs_kind_check
    CHECK (kind IN ('nightly', 'backfill', 'on_demand', 'export', 'survey'));
