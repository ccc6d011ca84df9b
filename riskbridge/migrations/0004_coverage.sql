-- riskbridge ledger, schema version 4: coverage, late arrivals, decided work skipped (docs/operations.md "Coverage").
--
-- A nightly run covers from the watermark (the end of the coverage it continues) to its trigger time and rediscovers
-- a lookback before the watermark; runs.watermark records where its new coverage began. Every windowed run that
-- finishes successfully adds its window to `coverage`: the nightly watermark, the report's gap check and
-- `riskbridge coverage` read it. A run that failed (a task that failed for good, the quarantine alert) covers
-- nothing, so the next nightly run covers its window again.
--
-- discover records a study that an earlier run scored and wrote back with the same model in `already_done`, not in
-- `studies`: no later stage sees it. A study it does add carries the latest earlier run that discovered it
-- (earlier_run: a quarantined study retried) and whether it is a late arrival (new to the ledger, its time before
-- the watermark). runs.rescore (`--rescore`) turns the skip off for a run.

ALTER TABLE runs
    ADD COLUMN watermark timestamptz,
    ADD COLUMN rescore boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT runs_watermark_in_window CHECK (
        watermark IS NULL OR (window_start IS NOT NULL AND watermark BETWEEN window_start AND window_end)
    );

CREATE TABLE coverage (
    run_id         bigint PRIMARY KEY REFERENCES runs ON DELETE CASCADE,
    kind           text NOT NULL CHECK (kind IN ('nightly', 'backfill')),
    covered_start  timestamptz NOT NULL,
    covered_end    timestamptz NOT NULL,    -- exclusive
    recorded       timestamptz NOT NULL DEFAULT now(),
    CHECK (covered_start < covered_end)
);
CREATE INDEX coverage_span ON coverage (covered_end, covered_start);

CREATE TABLE already_done (
    run_id          bigint NOT NULL REFERENCES runs ON DELETE CASCADE,
    study_uid       text NOT NULL,
    scored_run      bigint NOT NULL,        -- the run whose score was written back
    assessment_key  text NOT NULL,
    model           text NOT NULL,          -- "name version" the study was scored with
    recorded        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, study_uid)
);

ALTER TABLE studies
    ADD COLUMN earlier_run bigint,
    ADD COLUMN late_arrival boolean NOT NULL DEFAULT false;

-- discover asks, per study, for an earlier score of the same model and for an earlier run that found it.
CREATE INDEX scores_study ON scores (study_uid, model_name, model_version);
CREATE INDEX studies_study ON studies (study_uid);
