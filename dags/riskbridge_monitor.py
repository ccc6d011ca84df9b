"""riskbridge_monitor: weekly drift and outcome monitoring of the active model (riskbridge.airflow.dagkit)."""

from riskbridge.airflow.dagkit import monitor_dag

dag = monitor_dag()
