"""Orchestration support: the Prefect API server and the Dask cluster configuration."""
