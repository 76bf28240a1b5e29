"""Where per-date partition work can run (``flows.partitions``). Free of Prefect imports: the
CLI's parser reads it, and Prefect must not be imported before the CLI has pointed it at the
workspace (it reads its settings once, at import)."""

RUNNERS: tuple[str, ...] = ("threads", "dask")
