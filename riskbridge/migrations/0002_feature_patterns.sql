-- riskbridge ledger, schema version 2: the modality pattern the minimum-data policy judged each vector by.
--
-- The policy scores a patient when the model package's cross-validated AUROC for the patient's pattern of present
-- modalities reaches the feature spec's pattern_auroc_floor (docs/features.md). Both are recorded with the decision,
-- so a skipped or scored study shows which pattern it had and which validated AUROC let it through, and the run
-- report counts studies per pattern. Rows decided before this migration, and vectors of another feature spec (which
-- the policy cannot read), have no pattern.

ALTER TABLE features
    ADD COLUMN pattern text CHECK (pattern IN (
        'image+labs+notes', 'image+labs', 'image+notes', 'image', 'labs+notes', 'labs', 'notes', 'none'
    )),
    ADD COLUMN pattern_auroc double precision CHECK (pattern_auroc BETWEEN 0 AND 1),  -- NULL: not validated
    ADD CONSTRAINT features_pattern_decided CHECK (pattern IS NULL OR decision IS NOT NULL);
