-- riskbridge ledger, schema version 1: one row per decision of every stage of every run.
--
-- Every table is keyed by what makes a fact unique (run + study, run + series, ...), and the ledger writes with
-- INSERT ... ON CONFLICT, so a stage that runs twice writes nothing twice. A stage is resumable because it asks
-- the ledger what is not yet done (e.g. retrieve: chosen series without a complete retrieval).
--
-- PHI: only studies.patient_name and studies.patient_birth_date (with the PACS identifiers) are identifying, and
-- only because identity matching needs them between discover and match (which may run in different processes or
-- Airflow tasks). The ledger clears name and birth date as soon as the study's identity decision is recorded.
-- PatientID/issuer stay, as the key a reviewer needs for an identity decision. fhir_patient_id is the EHR's
-- internal resource id. Nothing else holds names, birth dates or note text.

CREATE TABLE runs (
    run_id        bigserial PRIMARY KEY,
    run_key       text NOT NULL UNIQUE,            -- e.g. airflow:<dag_id>:<run_id> or cli:<...>; a rerun resumes
    kind          text NOT NULL CHECK (kind IN ('nightly', 'backfill', 'on_demand')),
    status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'success', 'failed')),
    window_start  timestamptz,
    window_end    timestamptz,                     -- exclusive
    accessions    text[] NOT NULL DEFAULT '{}',
    patient_ids   text[] NOT NULL DEFAULT '{}',    -- PACS PatientIDs of an on-demand run
    started       timestamptz NOT NULL DEFAULT now(),
    finished      timestamptz,
    model         text,                            -- "name version sha256[:12]" of the scoring model
    CHECK ((window_start IS NULL) = (window_end IS NULL)),
    CHECK (window_start IS NULL OR window_start < window_end)
);

-- Run-level stages (discover, ...) that finished; per-item stages are resumed from their own tables.
CREATE TABLE stage_marks (
    run_id     bigint NOT NULL REFERENCES runs ON DELETE CASCADE,
    stage      text NOT NULL,
    completed  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, stage)
);

-- Wall seconds per stage and chunk (a chunk's key is a digest of its inputs); a rerun adds to the same row.
CREATE TABLE stage_timings (
    run_id       bigint NOT NULL REFERENCES runs ON DELETE CASCADE,
    stage        text NOT NULL,
    chunk        text NOT NULL,
    seconds      double precision NOT NULL CHECK (seconds >= 0),
    invocations  integer NOT NULL DEFAULT 1,
    done         integer NOT NULL DEFAULT 0,
    skipped      integer NOT NULL DEFAULT 0,
    quarantined  integer NOT NULL DEFAULT 0,
    failed       integer NOT NULL DEFAULT 0,
    updated      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, stage, chunk)
);

-- discover: the candidate studies (StudyRef). Patient name and birth date: see the PHI note above.
CREATE TABLE studies (
    run_id              bigint NOT NULL REFERENCES runs ON DELETE CASCADE,
    study_uid           text NOT NULL,
    accession           text,
    patient_id          text NOT NULL,
    patient_issuer      text,
    patient_other_ids   jsonb NOT NULL DEFAULT '[]',    -- [[id, issuer|null], ...]
    patient_name        text,                           -- PHI: cleared after matching
    patient_birth_date  text,                           -- PHI: cleared after matching
    patient_sex         text,
    study_datetime      text,                           -- ISO 8601 wall time as the PACS sent it (offset if known)
    timezone_offset     text,
    modalities          text[] NOT NULL DEFAULT '{}',
    description         text NOT NULL DEFAULT '',
    instance_count      integer,
    discovered          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, study_uid)
);

-- match: one identity decision per study (PatientLink).
CREATE TABLE identity_decisions (
    run_id           bigint NOT NULL,
    study_uid        text NOT NULL,
    outcome          text NOT NULL CHECK (outcome IN ('matched', 'needs-review', 'unmatched', 'conflict')),
    fhir_patient_id  text,
    reasons          text[] NOT NULL DEFAULT '{}',
    candidate_ids    text[] NOT NULL DEFAULT '{}',
    score            double precision,
    decided          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, study_uid),
    FOREIGN KEY (run_id, study_uid) REFERENCES studies ON DELETE CASCADE,
    CHECK ((outcome = 'matched') = (fhir_patient_id IS NOT NULL))
);

-- select: the outcome per study, and a decision per series (SeriesDecision).
CREATE TABLE selections (
    run_id              bigint NOT NULL,
    study_uid           text NOT NULL,
    rule_set            text NOT NULL,
    chosen_series_uid   text,                           -- NULL: no usable series
    expected_instances  integer,                        -- the SERIES-level C-FIND count of the chosen series
    reason              text NOT NULL,
    decided             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, study_uid),
    FOREIGN KEY (run_id, study_uid) REFERENCES studies ON DELETE CASCADE
);

CREATE TABLE series_decisions (
    run_id      bigint NOT NULL,
    study_uid   text NOT NULL,
    series_uid  text NOT NULL,
    chosen      boolean NOT NULL,
    rule        text NOT NULL,
    reason      text NOT NULL,
    rank        integer,
    judged      jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, study_uid, series_uid),
    FOREIGN KEY (run_id, study_uid) REFERENCES selections ON DELETE CASCADE
);
CREATE UNIQUE INDEX series_decisions_one_chosen ON series_decisions (run_id, study_uid) WHERE chosen;

-- retrieve: the chosen series staged (RetrievedSeries) or why not; the index time read from a staged header.
CREATE TABLE retrievals (
    run_id             bigint NOT NULL,
    study_uid          text NOT NULL,
    series_uid         text NOT NULL,
    complete           boolean NOT NULL,
    path               text,
    expected           integer,
    received           integer,
    transport          text,
    seconds            double precision,
    bytes              bigint,
    attempts           integer NOT NULL DEFAULT 1,    -- ledger attempts (each may retry missing instances itself)
    missing            integer NOT NULL DEFAULT 0,
    failure_code       text,
    failure_detail     text,
    index_time         timestamptz,
    index_time_source  text,
    updated            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, study_uid),
    UNIQUE (run_id, series_uid),
    FOREIGN KEY (run_id, study_uid) REFERENCES selections ON DELETE CASCADE,
    CHECK (NOT complete OR (path IS NOT NULL AND index_time IS NOT NULL))
);

-- clinical: every Observation considered for a lab feature, used or excluded with its reason (ClinicalValue).
CREATE TABLE clinical_values (
    run_id          bigint NOT NULL,
    study_uid       text NOT NULL,
    feature         text NOT NULL,
    observation_id  text NOT NULL,
    code            text NOT NULL,                  -- harmonize.windows.WindowReason: used, entered_in_error, ...
    status          text,
    effective       timestamptz,                    -- the time the window judged (UTC)
    value           double precision,               -- the feature's value in its canonical unit, when used
    unit            text,
    detail          text NOT NULL DEFAULT '',       -- e.g. the units module's reason for value_unusable
    PRIMARY KEY (run_id, study_uid, feature, observation_id),
    FOREIGN KEY (run_id, study_uid) REFERENCES retrievals ON DELETE CASCADE
);

-- clinical: every note read or left out, and every comorbidity mention found (NoteFinding). No note text.
CREATE TABLE note_dispositions (
    run_id         bigint NOT NULL,
    study_uid      text NOT NULL,
    resource_type  text NOT NULL,
    resource_id    text NOT NULL,
    code           text NOT NULL,                   -- used, status, outside_lookback, no_time, no_text
    PRIMARY KEY (run_id, study_uid, resource_type, resource_id),
    FOREIGN KEY (run_id, study_uid) REFERENCES retrievals ON DELETE CASCADE
);

CREATE TABLE note_findings (
    run_id      bigint NOT NULL,
    study_uid   text NOT NULL,
    note_id     text NOT NULL,                      -- ResourceType/id
    flag        text NOT NULL,
    span_start  integer NOT NULL,                   -- character offsets of the mention in the note text
    span_end    integer NOT NULL,
    assertion   text NOT NULL,                      -- present, negated, historical, hypothetical, family, uncertain
    counts      boolean NOT NULL,
    PRIMARY KEY (run_id, study_uid, note_id, flag, span_start),
    FOREIGN KEY (run_id, study_uid) REFERENCES retrievals ON DELETE CASCADE
);

-- clinical + harmonize: the feature vector with its mask, and the minimum-data decision (NULL until harmonize).
CREATE TABLE features (
    run_id           bigint NOT NULL,
    study_uid        text NOT NULL,
    fhir_patient_id  text NOT NULL,
    spec             text NOT NULL,                 -- FeatureSpec.label, name@version
    names            text[] NOT NULL,
    feature_values   double precision[] NOT NULL,
    observed         boolean[] NOT NULL,
    observation_ids  text[] NOT NULL DEFAULT '{}',
    document_ids     text[] NOT NULL DEFAULT '{}',
    decision         text CHECK (decision IN ('score', 'skip')),
    reasons          text[] NOT NULL DEFAULT '{}',
    built            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, study_uid),
    FOREIGN KEY (run_id, study_uid) REFERENCES retrievals ON DELETE CASCADE,
    CHECK (cardinality(names) = cardinality(feature_values) AND cardinality(names) = cardinality(observed))
);

-- score: one score per study and run (Score).
CREATE TABLE scores (
    run_id           bigint NOT NULL,
    study_uid        text NOT NULL,
    fhir_patient_id  text NOT NULL,
    model_name       text NOT NULL,
    model_version    text NOT NULL,
    model_sha256     text NOT NULL,
    probability      double precision NOT NULL CHECK (probability BETWEEN 0 AND 1),
    raw_probability  double precision NOT NULL CHECK (raw_probability BETWEEN 0 AND 1),
    risk             text NOT NULL CHECK (risk IN ('low', 'moderate', 'high')),
    attention        jsonb NOT NULL DEFAULT '{}',
    assessment_key   text NOT NULL,                 -- writeback.assessment_key(model version, patient, study)
    scored_at        timestamptz NOT NULL,          -- Provenance.recorded: fixed once, the same on every resend
    PRIMARY KEY (run_id, study_uid),
    FOREIGN KEY (run_id, study_uid) REFERENCES features ON DELETE CASCADE
);

-- write back: the outbox (WriteBack). One row per RiskAssessment key across all runs: a key is sent until the
-- server answers created or exists, and never again (the FHIR write is a conditional create, so a crash between
-- send and mark only makes the next send answer "exists").
CREATE TABLE writebacks (
    assessment_key  text PRIMARY KEY,
    run_id          bigint NOT NULL REFERENCES runs ON DELETE CASCADE,   -- the run that enqueued it
    study_uid       text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'created', 'exists', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    fhir_id         text,                           -- RiskAssessment id on the server
    last_error      text,
    updated         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX writebacks_open ON writebacks (run_id) WHERE status IN ('pending', 'failed');

-- Studies that left the pipeline, with the stage and a stable reason code (identity_conflict, identity_unmatched,
-- identity_needs_review, no_usable_series, no_index_time, retrieval codes, minimum-data codes, scoring_error).
CREATE TABLE quarantine (
    run_id     bigint NOT NULL,
    study_uid  text NOT NULL,
    stage      text NOT NULL,
    reason     text NOT NULL,
    detail     text NOT NULL DEFAULT '',
    recorded   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, study_uid),
    FOREIGN KEY (run_id, study_uid) REFERENCES studies ON DELETE CASCADE
);
CREATE INDEX quarantine_reason ON quarantine (run_id, reason);
