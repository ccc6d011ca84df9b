-- riskbridge ledger, schema version 8: PHI retention (`riskbridge db purge`, docs/ledger.md "PHI and retention").
--
-- The match stage clears a study's PACS name and birth date as soon as its identity is decided. `riskbridge db
-- purge` clears the rest of what names a patient once a run has had no activity for [retention] phi_days: on
-- `studies` the PACS PatientID and other ids (MRNs), the accession number, sex and the study description; on `runs`
-- an on-demand or export run's accession numbers and PatientIDs. Sooner ([retention] undecided_days) it clears the
-- names and birth dates of studies whose run stopped before their identity was decided. UIDs, identity decisions
-- (with the EHR's Patient id), selections, scores, the outbox, `already_done` and `coverage` stay: the audit trail,
-- the already-done skip and the coverage read nothing that is cleared.
--
-- runs.phi_purged records when a run's identifiers were cleared: such a run is never resumed (its undecided
-- studies could not be matched any more); a new run key starts a new run. studies.patient_id is NULL once purged.

ALTER TABLE runs
    ADD COLUMN phi_purged timestamptz;

ALTER TABLE studies
    ALTER COLUMN patient_id DROP NOT NULL;
