"""riskbridge_nightly: every night, score the CT studies of the window before the run (riskbridge.airflow.dagkit)."""

from riskbridge.airflow.dagkit import nightly_dag

dag = nightly_dag()
