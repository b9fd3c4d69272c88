"""Synchronous mode: each worker takes the next input and runs it (``POST {run_url}/{model}``).

One synchronous request (and connection) per running generation; at most the limit's worth
in flight. An input whose attempts all failed gets its error as its entry; one whose answer was
lost (it may have run and been billed) is not sent again within the try, and
``on_unknown_submit`` decides whether a retry sends it (:mod:`~airflow_provider_fal.batch.unknown`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from functools import partial

from airflow_provider_fal.batch.attempts import SINGLE_ATTEMPT, LimitedAttempts
from airflow_provider_fal.batch.ledger import BatchLedger
from airflow_provider_fal.batch.results import FalNotSentError, error_entry, success_entry
from airflow_provider_fal.batch.unknown import answer_was_lost, unknown_outcome_error
from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.core.request import FalRequest
from airflow_provider_fal.exceptions import FalError


class SyncMode:
    """Runs ``items`` synchronously from as many worker threads as call :meth:`work`."""

    def __init__(
        self,
        client: FalClient,
        items: Sequence[FalRequest],
        ledger: BatchLedger,
        attempts: LimitedAttempts,
        to_send: Iterable[int] | None = None,
        on_unknown_submit: str = "fail",
    ) -> None:
        self.on_unknown_submit = on_unknown_submit
        self.client = client
        self.items = items
        self.ledger = ledger
        self.attempts = attempts
        self._to_send = list(range(len(items)) if to_send is None else to_send)
        self._next = 0

    def work(self) -> None:
        """One worker thread: run inputs until none is left or the batch stops."""
        while (index := self._take()) is not None:
            run = partial(self.client.send, self.items[index], retry_policy=SINGLE_ATTEMPT)
            try:
                response = self.attempts.send(index, run)
            except FalNotSentError:
                continue  # reported as not run at the end
            except FalError as error:
                if answer_was_lost(error):
                    error = unknown_outcome_error(
                        self.ledger,
                        index,
                        self.items[index].model_id,
                        datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        error,
                        on_unknown_submit=self.on_unknown_submit,
                        synchronous=True,
                    )
                self.ledger.record(index, error_entry(index, error), error)
            except Exception as unexpected:  # a bug must not lose the input: report it as its result
                self.ledger.record_unexpected(index, unexpected)
            else:
                entry = success_entry(index, response.output, response.request_id, response.billable_units)
                self.ledger.record(index, entry, None)

    def stop(self, *, abort: bool) -> None:
        """Start nothing more (requests in flight finish, whether or not ``abort``)."""
        self.attempts.limit.close()

    def _take(self) -> int | None:
        with self.ledger.lock:
            if self.ledger.stopping.is_set() or self._next >= len(self._to_send):
                return None
            index = self._to_send[self._next]
            self._next += 1
            return index
