"""A batch's results as a JSONL manifest under ``output_path``: one line per input, in input order.

Each line: ``index``, ``fingerprint`` (of the input's request), ``request_id``, ``ok`` and either
``output`` (with ``stored_path`` beside each stored file) or ``error``. The manifest is written
whole at the end of each try (under its final name only once complete); the per-input records
of the batch's durable progress (:mod:`~airflow_provider_fal.batch.progress_stores`) are written
as each input finishes, so nothing finished is lost when a try dies before the manifest.

Downstream tasks read it with :func:`read_manifest`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from airflow_provider_fal.media.files import file_prefix
from airflow_provider_fal.media.locations import read_location
from airflow_provider_fal.media.storage import LocalStore, ObjectStore


def manifest_name(task_id: str, map_index: int | None) -> str:
    """``<task>[__m<map index>]__manifest.jsonl``."""
    return f"{file_prefix(task_id, map_index=map_index)}__manifest.jsonl"


def manifest_lines(entries: Sequence[dict[str, Any]], fingerprints: Sequence[str]) -> Iterator[bytes]:
    for entry, fingerprint in zip(entries, fingerprints, strict=True):
        line: dict[str, Any] = {
            "index": entry["index"],
            "fingerprint": fingerprint,
            "request_id": entry.get("request_id"),
            "ok": bool(entry.get("ok")),
        }
        if "output" in entry:
            line["output"] = entry["output"]
        if "error" in entry:
            line["error"] = entry["error"]
        yield (json.dumps(line, separators=(",", ":")) + "\n").encode()


def write_manifest(
    store: LocalStore | ObjectStore, name: str, entries: Sequence[dict[str, Any]], fingerprints: Sequence[str]
) -> str:
    """Write the manifest as ``name`` in ``store``; its location."""
    store.prepare()
    store.write(name, manifest_lines(entries, fingerprints))
    return store.location(name)


def read_manifest(location: Any) -> list[dict[str, Any]]:
    """Every line of a manifest (a local path, ``file://`` or object storage URI), in input order.

    For downstream tasks: ``outputs(read_manifest(summary["manifest"]))`` gives the outputs of
    the successful inputs.
    """
    where = read_location(location, "manifest", "a file")
    if where.local is not None:
        with open(where.local, encoding="utf-8") as handle:
            text = handle.read()
    else:
        text = where.remote.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
