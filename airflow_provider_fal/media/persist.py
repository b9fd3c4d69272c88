"""Keep what was generated: the Airflow side of copying a fal result's media into the user's storage.

fal returns media as URLs that expire (see the object lifecycle), so a result that only
holds URLs loses its images once they do. The run operators call :func:`persist_task_media`
once a result is in (the batch operator stores each input's media as it finishes, see
:mod:`~airflow_provider_fal.operators.batch_delivery`): every fal file object in it is
downloaded into ``output_path`` (:mod:`media.download`), the locations are pushed to XCom
under ``fal_stored_paths`` and added to the ``extra`` of the task's outlet Asset events.

* A file only ever appears under its final name complete: it is written to a temporary
  name and renamed (local storage), or staged in a local temporary file and then uploaded
  (object storage, where an upload only becomes visible once complete).
* Names are deterministic and safe: ``<task>[__m<map index>][__i<input index>]__<position>.<ext>``,
  e.g. ``generate__images-0.png``, so a retried task overwrites its own files instead of
  adding new ones. Nothing in the model's output can choose a directory.

``output_path`` is a local absolute path, a ``file://`` URI, or any URI Airflow's
``ObjectStoragePath`` understands (``s3://conn_id@bucket/prefix/`` with the Amazon provider
installed, ``gs://`` ...), or an ``ObjectStoragePath``/``pathlib.Path`` object.

Finding file objects and naming files lives in :mod:`media.files`, reading locations in
:mod:`media.locations`, the storage side in :mod:`media.storage`.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.media.download import persist_media
from airflow_provider_fal.media.files import file_prefix

# The operators check ``output_path`` with ``open_store`` before sending anything, and import it from here.
from airflow_provider_fal.media.storage import open_store

__all__ = [
    "STORED_PATHS_XCOM_KEY",
    "annotate_outlets",
    "open_store",
    "persist_task_media",
    "publish_locations",
]

log = logging.getLogger(__name__)

#: XCom key under which the operators push the list of stored locations.
STORED_PATHS_XCOM_KEY = "fal_stored_paths"


def persist_task_media(
    result: Any,
    output_path: Any,
    context: Any,
    *,
    retry_policy: RetryPolicy | dict[str, Any] | None = None,
    logger: logging.Logger | None = None,
    input_index: int | None = None,
    **limits: Any,
) -> Any:
    """What the operators call once a result is in: store its media under ``output_path``.

    Files are named after the running task (and its map index), the locations are pushed to
    XCom under ``fal_stored_paths`` and added to the ``extra`` of the task's outlet Assets'
    events. Returns the result with ``stored_path`` beside each URL. ``limits``: where media may
    come from and how large they may be (see :class:`~.download.MediaPersister`, and
    :meth:`FalHook.download_limits <airflow_provider_fal.hooks.fal.FalHook.download_limits>`).
    """
    prefix = _task_prefix(context, input_index)
    persisted = persist_media(result, output_path, prefix=prefix, retry_policy=retry_policy, logger=logger, **limits)
    publish_locations(context, persisted.locations)
    return persisted.output


def _task_prefix(context: Any, input_index: int | None) -> str:
    """The file name prefix of the running task (and its map index; see :func:`.files.file_prefix`)."""
    ti = context["ti"]
    return file_prefix(ti.task_id, map_index=getattr(ti, "map_index", None), input_index=input_index)


def publish_locations(context: Any, locations: list[str]) -> None:
    """Push ``locations`` to XCom (``fal_stored_paths``) and put them in the outlet Asset events."""
    context["ti"].xcom_push(key=STORED_PATHS_XCOM_KEY, value=locations)
    annotate_outlets(context, locations)


def annotate_outlets(context: Any, locations: list[str]) -> None:
    """Put ``locations`` in the ``extra`` of the asset events the task emits for its outlet Assets."""
    task = context.get("task")
    events = context.get("outlet_events")
    if not locations or task is None or events is None:
        return
    from airflow.sdk import Asset

    for outlet in getattr(task, "outlets", None) or []:
        if isinstance(outlet, Asset):
            events[outlet].extra[STORED_PATHS_XCOM_KEY] = list(locations)
