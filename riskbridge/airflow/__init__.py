"""riskbridge's Airflow side: hooks for its Connections, the provider info that registers their types, the DAG wiring
shared by the DAG files in dags/, and a local Airflow home for tests and the demo.

Nothing here imports torch or MONAI at module level: the DAG processor imports these modules on every parse.
"""

__all__ = ["dagkit", "hooks", "local", "provider"]
