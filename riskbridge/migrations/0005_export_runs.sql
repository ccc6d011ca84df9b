-- riskbridge ledger, schema version 5: runs of kind `export` (`riskbridge cohort export`, docs/site-training.md).
--
-- An export run takes the stages up to harmonize over a retrospective window to build a labelled training table;
-- it scores nothing and writes nothing to the FHIR server, and it covers nothing (the nightly coverage is its own).

ALTER TABLE runs DROP CONSTRAINT runs_kind_check;
ALTER TABLE runs ADD CONSTRAINT runs_kind_check CHECK (kind IN ('nightly', 'backfill', 'on_demand', 'export'));
