"""riskbridge_cohort_export: a labelled, pseudonymized training table of a past window (riskbridge.airflow.dagkit)."""

from riskbridge.airflow.dagkit import cohort_export_dag

dag = cohort_export_dag()
