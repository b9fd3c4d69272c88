"""Warn when a task uses the local disk under an executor whose workers do not share it.

Under Celery, Kubernetes or any remote executor, a local ``output_path`` is written on one
worker's disk only, a local input file must exist on whichever worker runs the task, and a
deferred task may resume on another worker than the one that started it. Object storage
(``s3://``, ``gs://`` ...) works everywhere. The operators call :func:`warn_if_disk_not_shared`
once per try, after their inputs are checked.
"""

from __future__ import annotations

import logging
from typing import Any

#: Executors that run every task on the machine of the process that runs them (class names).
LOCAL_EXECUTORS = frozenset({"LocalExecutor", "SequentialExecutor", "DebugExecutor"})


def task_executor(operator: Any) -> str:
    """The executor that runs ``operator``: its own ``executor``, else Airflow's default (the first configured)."""
    own = getattr(operator, "executor", None)
    if own:
        return str(own)
    from airflow_provider_fal._compat import conf

    configured = conf.get("core", "executor", fallback="LocalExecutor") or "LocalExecutor"
    return configured.split(",")[0].strip()


def is_local_executor(name: str) -> bool:
    """Whether an executor setting (``LocalExecutor``, ``alias:path.to.Class``, ``path.to.Class``) runs locally."""
    class_name = name.split(":")[-1].strip().rsplit(".", 1)[-1]
    return class_name in LOCAL_EXECUTORS


def warn_if_disk_not_shared(operator: Any, local_fields: list[str], logger: logging.Logger) -> bool:
    """Log one warning naming ``local_fields`` (local paths the task uses) if its executor is not local.

    Returns whether it warned.
    """
    if not local_fields:
        return False
    executor = task_executor(operator)
    if is_local_executor(executor):
        return False
    logger.warning(
        "Local paths in %s, but this task runs under %s, whose workers do not share a disk: a local output_path "
        "is written on one worker only, a local input file must exist on every worker, and a deferred task may "
        "resume on another worker. Use object storage (e.g. 's3://aws_default@bucket/prefix/') or a disk every "
        "worker mounts.",
        ", ".join(local_fields),
        executor,
    )
    return True
