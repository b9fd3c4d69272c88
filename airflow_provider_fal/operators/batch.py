"""FalBatchRunOperator: run a whole list of inputs through one fal model from a single task."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from airflow_provider_fal._compat import BaseOperator, Context
from airflow_provider_fal.batch.budget import Budget, FalBudgetError, check_max_cost
from airflow_provider_fal.batch.inputs import prepare_inputs
from airflow_provider_fal.batch.results import BatchResult, FailurePolicy, FalBatchError
from airflow_provider_fal.batch.runner import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_PROGRESS_INTERVAL,
    FalBatchRunner,
    coerce_max_concurrency,
)
from airflow_provider_fal.core.billing import pricing_or_none
from airflow_provider_fal.core.client import DEFAULT_POLL_INTERVAL
from airflow_provider_fal.core.request import FalRequest
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.core.validation import optional_seconds, positive_seconds
from airflow_provider_fal.exceptions import FalConfigurationError, FalError
from airflow_provider_fal.hooks.fal import FalHook
from airflow_provider_fal.media.download import MediaPersister
from airflow_provider_fal.media.persist import annotate_outlets
from airflow_provider_fal.media.storage import LocalStore, open_store
from airflow_provider_fal.media.upload import FalUploadError, identity_of
from airflow_provider_fal.operators.batch_deferred import DEFERRABLE_NEEDS_PROGRESS, DeferredBatchMixin
from airflow_provider_fal.operators.batch_delivery import BatchDelivery
from airflow_provider_fal.operators.common import check_rendered_numbers
from airflow_provider_fal.operators.fal import fail_permanently
from airflow_provider_fal.operators.lineage import FalLineageMixin
from airflow_provider_fal.operators.shared_disk import warn_if_disk_not_shared
from airflow_provider_fal.operators.unknown_submit import check_on_unknown_submit

#: XCom key of the batch's counts (``return_value`` holds the per-input results).
SUMMARY_XCOM_KEY = "fal_batch_summary"


class FalBatchRunOperator(DeferredBatchMixin, FalLineageMixin, BaseOperator):
    """Run one fal model on every input of a list, with bounded concurrency, from one task.

    Every input is sent as its own synchronous request over one shared HTTP connection pool,
    at most ``max_concurrency`` at a time; when fal answers 429 (the account's concurrency
    limit) the batch lowers its concurrency and raises it again once the 429s stop. Each
    input is retried by the hook's retry policy, like a :class:`FalRunOperator` call.

    **Durable progress.** Each input's progress is recorded as it moves on (see
    :mod:`~airflow_provider_fal.batch.progress`): a retried (or cleared) task reuses every input
    an earlier try finished, polls the queued requests it left instead of resubmitting them, and
    sends only what never ran. With ``output_path`` the records live beside the results
    (``<output_path>/fal-batch-progress/``); without it, in the task's state (Airflow 3.3+) or an
    Airflow Variable, for batches of up to 1,000 inputs.

    **Results.** With ``output_path``, each input's media are stored as soon as it finishes,
    every input's entry goes to a JSONL manifest beside them (``<task>__manifest.jsonl``, read it
    with :func:`~airflow_provider_fal.batch.manifest.read_manifest`), and the XCom
    ``return_value`` is the batch's counts plus ``manifest``, the manifest's location: a batch of
    10,000 inputs puts a few hundred bytes in the metadata DB, not megabytes. Without
    ``output_path``, the XCom ``return_value`` is a list with one entry per input, in input order::

        {"index": 0, "ok": True, "output": {...model output...}, "request_id": "..."}
        {"index": 1, "ok": False, "error": {"error": "FalValidationError", "message": "...",
         "status_code": 422, "error_type": None, "request_id": "...", "detail": [...]}, "request_id": "..."}

    Inputs never sent because the batch stopped early have ``"error": "FalNotSentError"``. The
    counts go to XCom under ``fal_batch_summary``. When the failure policy is broken, the
    results are still pushed to ``return_value`` before the task fails, so nothing is lost (a
    downstream task with ``trigger_rule="all_done"`` can still read them).

    :param model_id: ``owner/app[/subpath]``, e.g. ``fal-ai/flux/schnell`` (templated).
    :param inputs: the model inputs, a list of JSON objects (templated; or an upstream task's
        output, e.g. ``load_prompts()`` or ``XComArg(task)``). All are validated before any is sent.
    :param max_concurrency: requests in flight at most (1..256, default 8). Keep it at or below
        your fal account's concurrency limit.
    :param max_failures: fail the task if more than this many inputs failed.
    :param max_failure_rate: fail the task if more than this fraction (0..1) of inputs failed.
        With neither set, any failed input fails the task (after every input was tried);
        ``max_failure_rate=1`` never fails it.
    :param fail_fast: stop sending as soon as a limit above is exceeded instead of trying
        every input first.
    :param start_timeout: seconds or timedelta a runner may take to start each request, >= 1
        (``X-Fal-Request-Timeout``; templated). Defaults to the connection's ``start_timeout``.
    :param object_lifecycle: how long generated media stay downloadable: seconds, timedelta,
        ``"never"`` or ``{"expiration_duration_seconds": N}`` (templated).
    :param hint: runner hint (``X-Fal-Runner-Hint``; templated).
    :param headers: other ``X-Fal-*`` headers, e.g. ``{"X-Fal-Store-IO": "0"}`` (templated).
    :param fal_conn_id: the fal connection (templated).
    :param timeout: read timeout of each request, seconds (default 600 s plus the start timeout).
    :param fal_retry_policy: a :class:`RetryPolicy` or dict of its fields, applied to each input.
    :param progress_interval: seconds between progress lines in the task log (default 30).
    :param output_path: a directory (absolute path, ``file://`` or object storage URI) to copy
        the media of every successful output into; each output then carries ``stored_path``
        beside each ``url``, and an input whose media cannot be stored counts as failed
        (templated; see docs/persist.md).
    :param use_queue: submit every input to fal's queue and poll them ("submit all, poll all")
        instead of one synchronous request per input. For long generations (video): waiting
        holds no connection, and a dropped connection loses nothing. ``max_concurrency`` then
        bounds the HTTP calls in flight (submits and polls), not the jobs queued on fal.
    :param poll_interval: queue mode: seconds between status polls of one request at first;
        polls of long-running requests back off to every 30 s at most (default 2).
    :param poll_timeout: queue mode: seconds a request may take from submit to completion
        before it is cancelled on fal and reported as failed (default: no limit).
    :param priority: queue mode: ``"normal"`` or ``"low"`` (``X-Fal-Queue-Priority``; templated).
    :param on_unknown_submit: queue mode: what a queue submit whose answer was lost (sent, no
        request id) does: ``"fail"`` (default) reports that input as failed for good, maybe
        billed, and fails the task without retries (clearing the task sends it again);
        ``"resubmit"`` lets a retry send it again (a duplicate may be billed).
    :param durable: keep the batch's progress across tries (default ``True``).
    :param max_cost: the most the batch may cost, in the currency of fal's pricing API (e.g. USD):
        the task fails before sending anything when the estimate (inputs to send x expected units x
        fal's unit price) exceeds it, and stops sending once the units fal reports as billed reach
        it (inputs in flight finish; the rest are reported as not sent). Needs fal's price of the
        model (connection extra ``api_url``). The estimate is logged either way.
    :param deferrable: submit every input to fal's queue from the worker (each recorded before
        the next), then wait in the triggerer with one trigger for the whole batch, which hands
        ended requests back to a worker to fetch and store (every 30 s at most while results come
        in), and defers again with the rest: no worker slot is held while fal generates. Needs
        durable progress (``output_path``, or at most 1,000 inputs).
    """

    template_fields: Sequence[str] = (
        "model_id",
        "inputs",
        "start_timeout",
        "object_lifecycle",
        "hint",
        "headers",
        "fal_conn_id",
        "output_path",
        "priority",
    )
    template_fields_renderers = {"inputs": "json", "headers": "json", "object_lifecycle": "json"}
    ui_color = "#d9c7ff"

    def __init__(
        self,
        *,
        model_id: str,
        inputs: Any,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_failures: int | None = None,
        max_failure_rate: float | None = None,
        fail_fast: bool = False,
        start_timeout: Any = None,
        object_lifecycle: Any = None,
        hint: str | None = None,
        headers: dict[str, Any] | None = None,
        fal_conn_id: str = FalHook.default_conn_name,
        timeout: float | None = None,
        fal_retry_policy: RetryPolicy | dict[str, Any] | None = None,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        output_path: Any = None,
        use_queue: bool = False,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        poll_timeout: float | None = None,
        priority: str | None = None,
        on_unknown_submit: str = "fail",
        durable: bool = True,
        deferrable: bool = False,
        max_cost: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_cost = check_max_cost(max_cost)
        if not isinstance(deferrable, bool):
            raise FalConfigurationError(f"deferrable must be True or False, got {deferrable!r}.")
        if deferrable and (not durable or poll_timeout is not None):
            raise FalConfigurationError(
                "deferrable=True keeps the batch's progress between deferrals: it needs durable=True, and it has "
                "no poll_timeout (use the task's execution_timeout)."
            )
        self.deferrable = deferrable
        self.on_unknown_submit = check_on_unknown_submit(on_unknown_submit)
        if not isinstance(durable, bool):
            raise FalConfigurationError(f"durable must be True or False, got {durable!r}.")
        self.durable = durable
        self.output_path = output_path
        self.model_id = model_id
        self.inputs = inputs
        # Settings that are not templated are checked here, so a bad value fails the DAG import.
        self.max_concurrency = coerce_max_concurrency(max_concurrency)
        self.failure_policy = FailurePolicy(
            max_failures=max_failures, max_failure_rate=max_failure_rate, fail_fast=fail_fast
        )
        self.progress_interval = positive_seconds(progress_interval, "progress_interval")
        if not isinstance(use_queue, bool):
            raise FalConfigurationError(f"use_queue must be True or False, got {use_queue!r}.")
        self.use_queue = use_queue
        self.poll_interval = positive_seconds(poll_interval, "poll_interval")
        self.poll_timeout = optional_seconds(poll_timeout, "poll_timeout")
        if not (use_queue or deferrable) and (priority is not None or poll_timeout is not None):
            raise FalConfigurationError(
                "priority and poll_timeout apply to queued requests only; set use_queue=True, or drop them."
            )
        self.priority = priority
        self.start_timeout = start_timeout
        self.object_lifecycle = object_lifecycle
        self.hint = hint
        self.headers = headers
        self.fal_conn_id = fal_conn_id
        self.timeout = timeout
        self.fal_retry_policy = RetryPolicy.from_value(fal_retry_policy)
        self._runner: FalBatchRunner | None = None

    @cached_property
    def hook(self) -> FalHook:
        return FalHook(
            fal_conn_id=self.fal_conn_id,
            retry_policy=self.fal_retry_policy,
            timeout=self.timeout,
            pool_maxsize=self.max_concurrency,
        )

    def prepare(self) -> tuple[FalRequest, list[FalRequest]]:
        """The shared request (model, headers, timeouts; the connection's defaults applied) and one
        prepared request per input, all validated; fails the task (no retries) naming the field."""
        try:
            if self.output_path and isinstance(open_store(self.output_path), LocalStore):
                warn_if_disk_not_shared(self, ["output_path"], self.log)
            shared = self.hook.prepare(
                self.model_id,
                None,
                start_timeout=self.start_timeout,
                object_lifecycle=self.object_lifecycle,
                hint=self.hint,
                priority=self.priority,
                headers=self.headers,
                timeout=self.timeout,
            )
            items = prepare_inputs(shared, self.inputs, convert=self._upload_files)
        except FalError as error:
            if isinstance(error, FalUploadError) and not error.permanent:
                raise  # a CDN upload that failed for a transient reason: Airflow's retries may help
            raise fail_permanently(error) from error
        return shared, items

    def _upload_files(self, item: Any, where: str) -> tuple[Any, Any]:
        """One input with its files as CDN URLs or data: URIs, and its identity for fingerprints
        (uploads named by digest: a retry's new upload URLs still match its progress records)."""
        sent = self.hook.upload_inputs(item, field=where)
        return sent, identity_of(sent, self.hook.__dict__.get("uploader"))

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        check_rendered_numbers(self)

    def execute(self, context: Context) -> Any:
        shared, items = self.prepare()
        try:
            runner = FalBatchRunner(
                self.hook.client,
                max_concurrency=self.max_concurrency,
                failure_policy=self.failure_policy,
                progress_interval=self.progress_interval,
                logger=self.log,
                use_queue=self.use_queue or self.deferrable,
                poll_interval=self.poll_interval,
                poll_timeout=self.poll_timeout,
            )
        except FalError as error:
            raise fail_permanently(error) from error
        self._runner = runner
        delivery = self._delivery(context, [item.fingerprint() for item in items])
        if self.deferrable and delivery.progress is None:
            raise fail_permanently(FalConfigurationError(DEFERRABLE_NEEDS_PROGRESS))
        pricing = pricing_or_none(lambda: self.hook.get_pricing(shared.model_id), self.log, shared.model_id)
        try:
            result = runner.run(
                items,
                model_id=shared.model_id,
                progress=delivery.progress,
                finish=delivery.finish,
                on_unknown_submit=self.on_unknown_submit,
                submit_only=self.deferrable,
                budget=Budget(pricing, self.max_cost),
            )
        except FalBudgetError as error:
            raise fail_permanently(error) from error
        finally:
            delivery.close()
        if self.deferrable:
            assert delivery.progress is not None
            delivery.progress.remember(shared.model_id)  # the later rounds need not prepare the inputs again
            return self.defer_or_finish(context, shared.model_id, len(items), delivery, stopped=result.stopped)
        return self.deliver(context, result, delivery)

    def _delivery(self, context: Context, fingerprints: list[str] | None) -> BatchDelivery:
        """Where this try's results go: media under ``output_path``, durable progress, the manifest
        (``fingerprints`` of the inputs; ``None``: those the batch's first round remembered)."""
        store = open_store(self.output_path) if self.output_path else None
        persister = None
        if store is not None:
            persister = MediaPersister(
                self.output_path,
                retry_policy=self.fal_retry_policy,
                logger=self.log,
                pool_maxsize=self.max_concurrency,
                **self.hook.download_limits(),
            )
        return BatchDelivery(
            context, fingerprints, store=store, persister=persister, durable=self.durable, log=self.log
        )

    def deliver(self, context: Context, result: BatchResult, delivery: BatchDelivery) -> Any:
        """Manifest, XCom and lineage of a finished batch; fails the task when its policy says so."""
        summary = result.summary()
        self.fal_lineage.billed_units = summary.get("billed_units")
        manifest = delivery.write_manifest(result.results)
        for entry in result.results:
            self.fal_lineage.add_request(entry.get("request_id"))
        if manifest is not None:
            summary["manifest"] = manifest
            self.log.info("fal batch: every input's result is in the manifest %s", manifest)
            self.fal_lineage.add_stored(manifest)
            annotate_outlets(context, [manifest])
        else:
            for entry in result.results:
                self.fal_lineage.add_output(entry.get("output"))
        returned: Any = summary if manifest is not None else result.results
        context["ti"].xcom_push(key=SUMMARY_XCOM_KEY, value=summary)
        error = self._policy_error(result, summary, manifest)
        if error is not None:
            # Keep every result, the successful (and billed) ones included, before failing.
            context["ti"].xcom_push(key="return_value", value=returned)
            if error.permanent:
                raise fail_permanently(error) from error
            raise error
        delivery.succeeded()
        return returned

    def lineage_arguments(self) -> list[Any]:
        """Every input, whose files are this task's lineage inputs."""
        inputs = self.inputs if isinstance(self.inputs, (list, tuple)) else []
        return list(inputs)

    def _policy_error(self, result: BatchResult, summary: dict[str, Any], manifest: str | None) -> FalBatchError | None:
        """The task's failure when the batch broke its failure policy or stopped early."""
        failed = result.failed - result.not_run
        breach = self.failure_policy.exceeded(result.failed, result.total)
        if breach is None and result.stopped is None:
            return None
        reason = breach or f"the batch stopped early: {result.stopped}"
        kinds = ", ".join(f"{name} x{count}" for name, count in result.errors_by_type.most_common())
        where = f"the manifest {manifest}" if manifest else "this task's XCom 'return_value'"
        message = (
            f"fal batch {result.model_id}: {reason} ({result.succeeded} succeeded, {failed} failed"
            f"{f', {result.not_run} not sent' if result.not_run else ''}; {kinds or 'no errors'}). Every "
            f"input's result, successful ones included, is in {where}."
        )
        if self.durable:
            message += " A retry sends only the inputs that did not succeed."
        # A retry is only worth it when some failure could go away on its own; a lost submit
        # answer (on_unknown_submit="fail") stops retries, so nothing is billed twice.
        permanent = result.transient_failures == 0 or (result.unknown_submits > 0 and self.on_unknown_submit == "fail")
        return FalBatchError(message, summary=summary, permanent=permanent)

    def on_kill(self) -> None:
        # Send nothing more and cancel what is queued on fal; then drop the open connections:
        # fal cancels a synchronous request whose connection drops.
        if self._runner is not None:
            self._runner.cancel("the task was killed", cancel_submitted=True)
        if "hook" in self.__dict__:
            self.hook.close()
