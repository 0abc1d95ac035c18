"""Per-subject pipelines built from the library: load -> compute -> save. No Prefect here."""
