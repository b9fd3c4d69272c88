"""The deferrable side of FalBatchRunOperator (``deferrable=True``).

1. ``execute`` submits every input that needs sending to fal's queue from the worker, each
   recorded in the batch's durable progress before the next (the batch runner with
   ``submit_only``), then defers with one :class:`~airflow_provider_fal.triggers.batch.FalBatchTrigger`
   for every request still queued (this try's and those an earlier try left).
2. The trigger polls them from the triggerer and hands back the ones that ended. With
   ``output_path``, it first reads their results and records them in the batch's progress
   folder (:mod:`~airflow_provider_fal.triggers.batch_results`): a result fal keeps only
   minutes is then safe however long the task waits for a worker slot.
3. ``execute_complete`` stores those results' media on a worker (reading from fal only the
   results the trigger handed back unread), records them, and defers again with the rest;
   once none is left, the batch is delivered as a synchronous one is (manifest, XCom, failure
   policy).

Everything between deferrals lives in the progress records, so a triggerer restart re-polls,
a worker that dies while fetching leaves records a retry picks up, and nothing is submitted
twice.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow_provider_fal.batch.progress import Resumed
from airflow_provider_fal.batch.results import BatchResult, FalNotSentError, error_entry, success_entry
from airflow_provider_fal.core.billing import pricing_or_none
from airflow_provider_fal.core.watch import FetchResult
from airflow_provider_fal.exceptions import FalError
from airflow_provider_fal.operators.batch_delivery import BatchDelivery
from airflow_provider_fal.triggers.batch import FalBatchTrigger
from airflow_provider_fal.triggers.batch_results import results_location

DEFERRABLE_NEEDS_PROGRESS = (
    "deferrable=True keeps the batch's progress between deferrals, and this batch has nowhere to keep it: "
    "set output_path (any number of inputs), or send at most 1,000 inputs."
)


class DeferredBatchMixin:
    """Needs the attributes and methods of FalBatchRunOperator (``prepare``, ``deliver``, ``hook`` ...)."""

    #: seconds the trigger waits, once a request ended, before handing the ended ones back (fal
    #: keeps results of 10 KB or more only 6 minutes)
    hand_back_after: float = 30.0
    #: the same, for results the trigger read and recorded in the batch's progress (safe from
    #: fal's retention; their media URLs are stored when handed back)
    recorded_hand_back_after: float = 120.0

    def defer_or_finish(
        self,
        context: Any,
        model_id: str,
        total: int,
        delivery: BatchDelivery,
        *,
        stopped: str | None = None,
        started_at: float | None = None,
        rate_hint: float | None = None,
    ) -> Any:
        """Defer with every request still queued on fal; with none left, deliver the batch."""
        assert delivery.progress is not None
        started_at = time.time() if started_at is None else started_at
        resumed = delivery.progress.resume()
        if resumed.fetched:  # recorded by a trigger and not stored yet (e.g. written late by an earlier copy)
            self._collect(model_id, total, {}, resumed.recorded_by_trigger(), delivery)
            resumed = delivery.progress.resume()
        if resumed.submitted:  # queued requests are polled to the end even when the batch stopped sending
            self.log.info(
                "fal batch %s: %d requests queued on fal, waiting for them in the triggerer (%s)",
                model_id,
                len(resumed.submitted),
                resumed.describe(),
            )
            self.defer(
                trigger=FalBatchTrigger(
                    requests={str(index): request_id for index, request_id in resumed.submitted.items()},
                    model_id=model_id,
                    fal_conn_id=self.fal_conn_id,
                    poll_interval=self.poll_interval,
                    concurrency=self.max_concurrency,
                    retry_policy=self.fal_retry_policy,
                    timeout=self.timeout,
                    started_at=started_at,
                    hand_back_after=self.hand_back_after,
                    recorded_hand_back_after=self.recorded_hand_back_after,
                    rate_hint=rate_hint,
                    results_at=(
                        results_location(self.output_path, delivery.progress_folder)
                        if delivery.progress_folder is not None
                        else None
                    ),
                    attempt=delivery.attempt,
                ),
                method_name="execute_complete",
            )
        result = final_result(model_id, total, resumed, stopped, time.time() - started_at)
        result.pricing = pricing_or_none(lambda: self.hook.get_pricing(model_id), self.log, model_id)
        return self.deliver(context, result, delivery)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> Any:
        """The trigger handed back ended requests: fetch, store and record them, then go on."""
        if not isinstance(event, dict) or event.get("status") not in ("ready", "error"):
            raise FalError(f"The fal batch trigger sent an unexpected event: {str(event)[:200]}")
        if event["status"] == "error":
            raise FalError.from_dict(event.get("error"))  # retryable: the retry polls the same requests
        delivery = self._delivery(context, None)  # the inputs' fingerprints as the first round remembered them
        model_id = delivery.model_id
        if delivery.progress is None or model_id is None:  # none remembered (e.g. deferred by an earlier version)
            delivery.close()
            shared, items = self.prepare()
            delivery = self._delivery(context, [item.fingerprint() for item in items])
            model_id = shared.model_id
        if delivery.progress is None:
            raise FalError(DEFERRABLE_NEEDS_PROGRESS)
        total = len(delivery.fingerprints)
        try:
            ready = event.get("ready") or {}
            fetched: dict[int, dict[str, Any]] = {}
            if delivery.progress_folder is not None:  # results a trigger recorded in the batch's progress
                fetched = delivery.progress.resume().recorded_by_trigger()
            self._collect(model_id, total, ready, fetched, delivery)
        finally:
            delivery.close()
        started_at, rate = event.get("started_at"), event.get("rate")
        return self.defer_or_finish(
            context,
            model_id,
            total,
            delivery,
            started_at=float(started_at) if isinstance(started_at, (int, float)) else None,
            rate_hint=float(rate) if isinstance(rate, (int, float)) and rate > 0 else None,
        )

    def _collect(
        self,
        model_id: str,
        total: int,
        ready: dict[str, Any],
        fetched: dict[int, dict[str, Any]],
        delivery: BatchDelivery,
    ) -> None:
        """Store and record the results the trigger recorded (``fetched``, by index) and every
        request handed back unread (``ready``), reading those from fal."""
        client = self.hook.client

        def collect(index_text: str, info: dict[str, Any]) -> None:
            index = int(index_text)
            if not 0 <= index < total or not isinstance(info, dict):
                return
            request_id = str(info.get("request_id") or "")
            if "error" in info:
                error = FalError.from_dict(info["error"])
                delivery.finish(index, error_entry(index, error), error)
                return
            handle = client.queue_handle(model_id, request_id)
            failure = FalError.from_dict(info["failure"]) if info.get("failure") else None
            try:
                response = client.fetch(handle, FetchResult(late=bool(info.get("late")), failure=failure))
            except FalError as error:
                delivery.finish(index, error_entry(index, error), error)
                return
            entry = success_entry(index, response.output, handle.request_id, response.billable_units)
            delivery.finish(index, entry, None)

        def store(index: int, entry: dict[str, Any]) -> None:
            # recorded in one save with the others below: until then its "fetched" record stands,
            # and a retry would store its media again, never send it again
            stored[index] = delivery.store_media(index, entry, None)[0]

        # a restarted trigger may hand back unread a result an earlier copy recorded (and fal has
        # since forgotten): the recorded one is used
        ready = {key: info for key, info in ready.items() if not (str(key).isdigit() and int(key) in fetched)}
        if not ready and not fetched:
            return
        failed = sum(1 for info in ready.values() if isinstance(info, dict) and "error" in info)
        self.log.info(
            "fal batch %s: %d requests ended: %d results recorded by the trigger, %d read from fal now, %d failed",
            model_id,
            len(ready) + len(fetched),
            len(fetched),
            len(ready) - failed,
            failed,
        )
        stored: dict[int, dict[str, Any]] = {}
        try:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(ready) + len(fetched))) as pool:
                futures = [pool.submit(store, index, entry) for index, entry in fetched.items()]
                futures += [pool.submit(collect, index, info) for index, info in ready.items()]
                for future in futures:
                    future.result()
        finally:
            delivery.record(stored)


def final_result(model_id: str, total: int, resumed: Resumed, stopped: str | None, elapsed: float) -> BatchResult:
    """The batch's entries and counts from its progress records, once nothing is queued any more."""
    results: list[dict[str, Any]] = []
    errors: Counter[str] = Counter()
    transient = not_run = unknown = 0
    for index in range(total):
        if index in resumed.done:
            entry = resumed.done[index]
        elif index in resumed.unstored:
            entry = {
                **resumed.unstored[index],
                "ok": False,
                "error": {"error": "FalDownloadError", "message": "Its media could not be stored.", "permanent": False},
            }
        elif index in resumed.failed_this_try:
            entry = resumed.failed_this_try[index]
        else:
            reason = f"the batch stopped ({stopped})" if stopped else "it was never submitted"
            entry = error_entry(index, FalNotSentError(f"Not sent: {reason}."))
            not_run += 1
        results.append(entry)
        error = entry.get("error")
        if not entry.get("ok") and isinstance(error, dict):
            errors[str(error.get("error"))] += 1
            transient += not error.get("permanent") and error.get("error") != "FalNotSentError"
            unknown += error.get("error") == "FalRequestLostError"
    return BatchResult(
        model_id=model_id,
        results=results,
        elapsed=elapsed,
        not_run=not_run,
        stopped=stopped,
        transient_failures=transient,
        errors_by_type=errors,
        reused=resumed.earlier_tries,
        unknown_submits=unknown,
    )
