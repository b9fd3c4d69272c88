"""Where a task remembers the fal request it submitted, so that a retry reattaches to it.

A retried task must not pay for the same generation twice. Before submitting, the operator
stores a "submit in flight" marker (time, model id, fingerprint of the inputs); after
submitting, the request (handle and fingerprint) replaces it. Both live in a place that
survives the end of the try; the next try reads it back before submitting anything.

* Airflow 3.3+: the task instance's ``task_state_store`` (AIP-103, the storage behind
  ``ResumableJobMixin``), scoped to this task instance and kept across its tries.
* Airflow 3.0-3.2: there is no task state, and XComs are cleared when a try starts, so the
  request is kept in an Airflow Variable named ``fal_queue_request_<hash>`` (the hash of dag
  id, run id, task id and map index; the description names them). It is deleted when the
  task succeeds or fails for good. Its value holds no secret: a request id, model id and fal's queue URLs, or
the marker's time, model id and input digest.

Failures of the store itself never fail the task: they are logged, and the worst outcome is
a retry that submits again, exactly what would happen without a store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import warnings
from typing import Any, Protocol

#: Key of the stored request in ``task_state_store`` (renaming it would orphan stored requests).
STATE_KEY = "fal_queue_request"
VARIABLE_PREFIX = "fal_queue_request_"

log = logging.getLogger(__name__)


class RequestStore(Protocol):
    """Keeps one JSON value per task instance across its tries."""

    where: str

    def load(self) -> dict[str, Any] | None: ...

    def save(self, value: dict[str, Any]) -> None: ...

    def clear(self) -> None: ...


class TaskStateRequestStore:
    """Airflow 3.3+: the value lives in ``context["task_state_store"]``."""

    def __init__(self, accessor: Any, key: str = STATE_KEY) -> None:
        self._accessor = accessor
        self.key = key
        self.where = f"task_state_store[{key!r}]"

    def load(self) -> dict[str, Any] | None:
        value = self._accessor.get(self.key)
        return value if isinstance(value, dict) else None

    def save(self, value: dict[str, Any]) -> None:
        self._accessor.set(self.key, value)

    def clear(self) -> None:
        self._accessor.delete(self.key)


class VariableRequestStore:
    """Airflow < 3.3: the value lives in an Airflow Variable named after the task instance."""

    def __init__(
        self, dag_id: str, run_id: str, task_id: str, map_index: int, *, name: str = STATE_KEY, what: str = ""
    ) -> None:
        identity = f"{dag_id}\x00{run_id}\x00{task_id}\x00{map_index}"
        self.key = f"{name}_" + hashlib.sha256(identity.encode()).hexdigest()[:32]
        self.description = what or (
            "fal request submitted by {task}; kept so that a retry reattaches instead of paying twice. "
            "Deleted when the task succeeds or fails for good."
        )
        self.description = self.description.format(
            task=f"dag_id={dag_id} task_id={task_id} run_id={run_id} map_index={map_index}"
        )
        self.where = f"Airflow Variable {self.key!r}"

    @staticmethod
    def _variable() -> Any:
        """The Task SDK's Variable inside a task runner, else the metadata-DB one (``dags test``)."""
        runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
        if runner is not None and hasattr(runner, "SUPERVISOR_COMMS"):
            from airflow.sdk import Variable

            return Variable
        from airflow.models import Variable

        return Variable

    def load(self) -> dict[str, Any] | None:
        variable = self._variable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if variable.__module__.startswith("airflow.sdk"):
                raw = variable.get(self.key, default=None)
            else:
                raw = variable.get(self.key, default_var=None)
        if raw is None:
            return None
        value = json.loads(raw) if isinstance(raw, str) else raw
        return value if isinstance(value, dict) else None

    def save(self, value: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._variable().set(self.key, json.dumps(value), description=self.description)

    def clear(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._variable().delete(self.key)


def request_store(context: Any, name: str = STATE_KEY, what: str = "") -> RequestStore:
    """The store for the running task instance: task state on Airflow 3.3+, else a Variable.

    ``name`` is the task state key (and the Variable's name prefix); ``what`` describes the
    Variable (``{task}`` is replaced by the task instance).
    """
    accessor = context.get("task_state_store")
    if accessor is not None:
        return TaskStateRequestStore(accessor, name)
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    map_index = -1 if map_index is None else int(map_index)
    return VariableRequestStore(ti.dag_id, ti.run_id, ti.task_id, map_index, name=name, what=what)


class SafeStore:
    """Wraps a store so that its failures are logged, never raised."""

    def __init__(self, store: RequestStore | None, logger: logging.Logger | None = None) -> None:
        self._store = store
        self.log = logger or log
        self.where = store.where if store is not None else "nowhere (durable=False)"

    def load(self) -> dict[str, Any] | None:
        if self._store is None:
            return None
        try:
            return self._store.load()
        except Exception as error:
            self.log.warning("Could not read the stored fal request from %s: %s", self.where, error)
            return None

    def save(self, value: dict[str, Any]) -> bool:
        if self._store is None:
            return False
        try:
            self._store.save(value)
            return True
        except Exception as error:
            self.log.warning(
                "Could not store the fal request in %s (%s); a retry of this task would submit it again.",
                self.where,
                error,
            )
            return False

    def clear(self) -> None:
        if self._store is None:
            return
        try:
            self._store.clear()
        except Exception as error:
            self.log.warning("Could not delete the stored fal request from %s: %s", self.where, error)
