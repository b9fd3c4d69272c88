"""A batch's inputs, checked and encoded once: one prepared :class:`FalRequest` per input.

:func:`prepare_inputs` takes the shared request (model, headers, timeouts, built by
:func:`~airflow_provider_fal.core.request.prepare_request` or ``FalHook.prepare``) and the
inputs as the operator got them (a list, an upstream task's XCom, or a rendered template), and
returns the same call once per input, each body JSON-encoded exactly once. Every bad input is
reported by index, up to five, before anything is sent.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from airflow_provider_fal.core.request import FalRequest
from airflow_provider_fal.exceptions import FalConfigurationError

#: Bad inputs named one by one in the error; further ones are only counted.
SHOWN_PROBLEMS = 5


def prepare_inputs(
    request: FalRequest, value: Any, field: str = "inputs", convert: Callable[[Any, str], tuple[Any, Any]] | None = None
) -> list[FalRequest]:
    """``request`` once per model input of ``value``, each input validated like ``arguments``.

    Accepts a list (or any non-string iterable, e.g. a resolved XComArg) of dicts or JSON-object
    strings, or a string holding a JSON list (as a rendered template gives). ``convert(item,
    where)`` may replace each item first: it returns the item to send and its identity for the
    request's fingerprint (None: the item; see ``FalRequest.with_arguments``). Raises
    :class:`FalConfigurationError` naming every bad input (up to five) by index.
    """
    items: list[FalRequest] = []
    problems: list[str] = []
    for index, item in enumerate(input_list(value, field)):
        try:
            where = f"{field}[{index}]"
            sent, identity = convert(item, where) if convert else (item, None)
            items.append(request.with_arguments(sent, field=where, identity=identity))
        except FalConfigurationError as error:
            problems.append(error.message)
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        extra = len(problems) - SHOWN_PROBLEMS
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise FalConfigurationError(
            f"{len(problems)} of the {len(problems) + len(items)} {field} are invalid; nothing was sent:\n  "
            f"{shown}{more}"
        )
    return items


def input_list(value: Any, field: str = "inputs") -> Iterable[Any]:
    """The inputs as an iterable of (unchecked) items; raises when ``value`` is not a list of them."""
    if value is None:
        raise FalConfigurationError(f"{field} is required: a list of model inputs like [{{'prompt': 'a cat'}}, ...].")
    if isinstance(value, (str, bytes)):
        value = _parse_list_text(value.decode() if isinstance(value, bytes) else value, field)
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise FalConfigurationError(
            f"{field} must be a list of model inputs (one dict per call), got {type(value).__name__}; "
            "e.g. [{'prompt': 'a cat'}, {'prompt': 'a dog'}]."
        )
    return value


def _parse_list_text(text: str, field: str) -> Any:
    """A rendered template: JSON, or the Python repr Jinja gives for a list of dicts."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise FalConfigurationError(
            f"{field} is a string that is neither a JSON list nor a Python list literal. Pass the list "
            "itself (e.g. an upstream task's XComArg, `task.output`), or render it as JSON with "
            "`{{ ... | tojson }}`."
        ) from None


def chunked(inputs: Sequence[Any], size: int) -> list[list[Any]]:
    """``inputs`` in consecutive chunks of at most ``size``, in order: for sharding a batch with
    ``FalBatchRunOperator.partial(...).expand(inputs=chunked(prompts, 2000))``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise FalConfigurationError(f"the chunk size must be a whole number >= 1, got {size!r}.")
    items = list(inputs)
    return [items[start : start + size] for start in range(0, len(items), size)]
