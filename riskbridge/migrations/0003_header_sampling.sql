-- riskbridge ledger, schema version 3: where each series attribute came from, and what header sampling cost.
--
-- A strict PACS answers C-FIND with the standard query keys only; what the series rules or identity matching need
-- beyond them is read from the header of one retrieved instance (docs/series-selection.md "Header sampling").
-- Each series decision records the source of every attribute it judged ("series": SERIES-level C-FIND,
-- "image": IMAGE-level C-FIND, "header": a sampled instance), each selection how many series were sampled for it
-- and the seconds that took, and each identity decision whether the patient's identifiers came from a sampled
-- header. Rows written before this migration have no sources and no sampling.

ALTER TABLE series_decisions
    ADD COLUMN sources jsonb NOT NULL DEFAULT '{}';

ALTER TABLE selections
    ADD COLUMN sampled_series integer NOT NULL DEFAULT 0 CHECK (sampled_series >= 0),
    ADD COLUMN sampling_seconds double precision NOT NULL DEFAULT 0 CHECK (sampling_seconds >= 0);

ALTER TABLE identity_decisions
    ADD COLUMN from_sampled_header boolean NOT NULL DEFAULT false;
