-- riskbridge ledger, schema version 6: shadow scores of a candidate model, and promotions (docs/site-training.md).
--
-- With [run] shadow_package set, the score stage scores every study it scores with the active model again with the
-- candidate and records the result here, never in `scores`: the write-back reads `scores` only, so a candidate's
-- score never reaches the FHIR server. The run report compares the two. A study the candidate could not score has
-- its error instead of a probability.

CREATE TABLE shadow_scores (
    run_id           bigint NOT NULL,
    study_uid        text NOT NULL,
    model_name       text NOT NULL,
    model_version    text NOT NULL,
    model_sha256     text NOT NULL,
    probability      double precision CHECK (probability BETWEEN 0 AND 1),
    raw_probability  double precision CHECK (raw_probability BETWEEN 0 AND 1),
    risk             text CHECK (risk IN ('low', 'moderate', 'high')),
    error            text,
    scored_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, study_uid, model_sha256),
    FOREIGN KEY (run_id, study_uid) REFERENCES features ON DELETE CASCADE,
    CHECK ((probability IS NULL) = (error IS NOT NULL))
);

-- `riskbridge model promote`: each promotion that passed its checks, with the shadow record it rested on.
CREATE TABLE model_promotions (
    promotion_id    bigserial PRIMARY KEY,
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    model_sha256    text NOT NULL,
    package_path    text NOT NULL,
    feature_spec    text NOT NULL,
    shadow_runs     integer NOT NULL CHECK (shadow_runs >= 0),
    shadow_studies  integer NOT NULL CHECK (shadow_studies >= 0),
    shadow_failed   integer NOT NULL CHECK (shadow_failed >= 0),
    promoted        timestamptz NOT NULL DEFAULT now()
);
