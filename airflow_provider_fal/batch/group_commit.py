"""Group commit: records written by many threads at once are saved together, each durable on return.

A thread that finds a save under way waits for it; the next save carries every record written
meanwhile, so 32 threads recording their inputs cost about one save per round of them instead
of 32. :meth:`GroupCommit.write` returns only once a save holding its record succeeded, which is
what makes a ``submitting`` record durable before its request is sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: Saves a group of records (input index -> record); durable once it returns, raises when it failed.
SaveGroup = Callable[[dict[int, dict[str, Any]]], None]


class GroupCommit:
    """Hands the records written since the last save to ``save``, one group at a time; thread-safe."""

    def __init__(self, save: SaveGroup) -> None:
        self._save = save
        self._pending: dict[int, dict[str, Any]] = {}
        self._changes = threading.Lock()
        self._saving = threading.Lock()
        self._version = 0
        self._saved = 0
        #: groups saved so far (for tests and benchmarks)
        self.saves = 0

    def write(self, index: int, record: dict[str, Any]) -> None:
        """Record ``record`` as input ``index``'s; returns once a save that holds it is done.

        When that save fails, its records are put back (unless newer ones replaced them) and the
        error is raised here; the threads whose records were in it try again themselves.
        """
        self.write_many({index: record})

    def write_many(self, records: dict[int, dict[str, Any]]) -> None:
        """:meth:`write` for several inputs at once: one save holds them all."""
        with self._changes:
            for index, record in records.items():
                self._pending[int(index)] = record
            self._version += 1
            mine = self._version
        self._save_pending(mine)

    def save_now(self) -> None:
        """Save at once, with whatever records wait (maybe none): after a change every save carries."""
        self._save_pending(None)

    def _save_pending(self, mine: int | None) -> None:
        with self._saving:
            if mine is not None and self._saved >= mine:
                return  # a save made while this thread waited already holds its record
            with self._changes:
                group, self._pending = self._pending, {}
                version = self._version
            if mine is not None and not group:  # a failed save's records were put back and saved since
                return
            try:
                self._save(group)
            except BaseException:
                with self._changes:
                    self._pending = {**group, **self._pending}
                raise
            self._saved = version
            self.saves += 1
