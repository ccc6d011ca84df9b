"""riskbridge_backfill: score the CT studies of a date range (params start, end; riskbridge.airflow.dagkit)."""

from riskbridge.airflow.dagkit import backfill_dag

dag = backfill_dag()
