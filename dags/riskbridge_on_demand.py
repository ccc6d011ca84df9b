"""riskbridge_on_demand: score the studies of given accessions or patient IDs (riskbridge.airflow.dagkit)."""

from riskbridge.airflow.dagkit import on_demand_dag

dag = on_demand_dag()
