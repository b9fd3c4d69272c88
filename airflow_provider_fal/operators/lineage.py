"""OpenLineage for the fal operators: which model made which files from which inputs.

The operators remember, while they run, the fal request ids and the stored outputs
(:class:`LineageRecord`); :class:`FalLineageMixin` turns that into an ``OperatorLineage`` when
the OpenLineage provider asks (``get_openlineage_facets_on_complete`` / ``..._on_failure``):

* inputs: the files in the model arguments (``Path``/``ObjectStoragePath`` objects, and
  ``file://``/object-storage strings with ``inline_file_uris=True``);
* outputs: every file stored under ``output_path`` (its ``stored_path``);
* a ``fal`` run facet: the model id, the request ids and, where fal reported them, billed units.

Dataset names follow OpenLineage's naming: a local path is namespace ``file`` with the absolute
path as name; ``s3://conn@bucket/key`` is namespace ``s3://bucket`` with ``key`` as name.
``apache-airflow-providers-openlineage`` is optional (extra ``openlineage``) and imported only
inside these methods.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_fal.media.files import STORED_PATH_KEY
from airflow_provider_fal.media.locations import is_object_storage_path, uri_scheme

#: URI schemes of inputs fal fetches itself (not datasets of this task).
_REMOTE = frozenset({"http", "https", "data", "ftp"})


@dataclass
class LineageRecord:
    """What a task saw while it ran: request ids, stored file locations, billed units."""

    request_ids: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    billed_units: float | None = None  # filled where fal reports billable units
    #: what the lists hold, looked up in O(1): a batch of 10,000 inputs adds 10,000 request ids,
    #: and a lookup in the list each time took about half a second
    _seen: set[tuple[str, str]] = field(default_factory=set, repr=False, compare=False)

    def add_request(self, request_id: str | None) -> None:
        if request_id and ("request", request_id) not in self._seen:
            self._seen.add(("request", request_id))
            self.request_ids.append(request_id)

    def add_stored(self, location: str) -> None:
        if ("stored", location) not in self._seen:
            self._seen.add(("stored", location))
            self.stored.append(location)

    def add_output(self, output: Any) -> None:
        for location in stored_locations(output):
            self.add_stored(location)


def stored_locations(value: Any) -> Iterator[str]:
    """Every ``stored_path`` in a (persisted) result, in order."""
    if isinstance(value, Mapping):
        stored = value.get(STORED_PATH_KEY)
        if isinstance(stored, str):
            yield stored
        for item in value.values():
            yield from stored_locations(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from stored_locations(item)


def input_locations(arguments: Any, *, uris: bool) -> Iterator[str]:
    """The files a model's arguments read from this side (what the operator inlines or uploads)."""
    if isinstance(arguments, PurePath) or is_object_storage_path(arguments):
        yield str(arguments)
    elif isinstance(arguments, str):
        scheme = uri_scheme(arguments)
        if uris and scheme and scheme not in _REMOTE:
            yield arguments
    elif isinstance(arguments, Mapping):
        for item in arguments.values():
            yield from input_locations(item, uris=uris)
    elif isinstance(arguments, (list, tuple)):
        for item in arguments:
            yield from input_locations(item, uris=uris)


def dataset_name(location: str) -> tuple[str, str]:
    """(namespace, name) of a location under OpenLineage's naming conventions."""
    if location.startswith("/"):
        return "file", location
    parts = urlsplit(location)
    if parts.scheme == "file":
        return "file", parts.path
    bucket = parts.netloc.rpartition("@")[2]  # s3://conn_id@bucket/key: the connection is not part of the name
    return f"{parts.scheme}://{bucket}", parts.path.lstrip("/")


@cache
def _fal_run_facet_class() -> type:
    """The ``fal`` run facet, defined once the OpenLineage client is importable."""
    import attrs
    from openlineage.client.facet_v2 import RunFacet

    @attrs.define
    class FalRunFacet(RunFacet):
        """The fal model, its request ids and the billed units of this task's run."""

        modelId: str
        requestIds: list[str] = attrs.field(factory=list)
        billedUnits: float | None = None

    return FalRunFacet


class FalLineageMixin:
    """``get_openlineage_facets_on_complete``/``_on_failure`` from :attr:`fal_lineage`."""

    def lineage_model_id(self) -> str:
        return str(getattr(self, "model_id", ""))

    def lineage_arguments(self) -> list[Any]:
        """The argument sets whose files are inputs (one for a run, one per input for a batch)."""
        return [getattr(self, "arguments", None)]

    @property
    def fal_lineage(self) -> LineageRecord:
        record = self.__dict__.get("_fal_lineage")
        if record is None:
            record = self.__dict__["_fal_lineage"] = LineageRecord()
        return record

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        return self._operator_lineage()

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return self._operator_lineage()

    def _operator_lineage(self) -> Any:
        from airflow.providers.common.compat.openlineage.facet import Dataset
        from airflow.providers.openlineage.extractors import OperatorLineage

        uris = bool(getattr(self, "inline_file_uris", False))
        seen: dict[tuple[str, str], None] = {}
        for arguments in self.lineage_arguments():
            for location in input_locations(arguments, uris=uris):
                seen.setdefault(dataset_name(location), None)
        record = self.fal_lineage
        outputs = {dataset_name(location): None for location in record.stored}
        facet = _fal_run_facet_class()(
            modelId=self.lineage_model_id(), requestIds=list(record.request_ids), billedUnits=record.billed_units
        )
        return OperatorLineage(
            inputs=[Dataset(namespace=namespace, name=name) for namespace, name in seen],
            outputs=[Dataset(namespace=namespace, name=name) for namespace, name in outputs],
            run_facets={"fal": facet},
        )
