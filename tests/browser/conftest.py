"""One retry for a browser test whose first attempt timed out; never for anything else.

A loaded machine can make the real API server or the browser slower than any fixed bound.
When the first attempt of a test marked ``browser`` fails with a timeout (a Playwright
``TimeoutError``, :class:`ApiServerNotReady`, or :class:`ServerUnreachable` at sign-in), it
runs once more with fresh fixtures (a new API server, a new browser). Assertion failures,
including Playwright's ``expect``, are never retried, and a second failure fails the test.
The first attempt's failure is attached to the test's report and listed in the summary.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol

from tests.browser.support import ApiServerNotReady, ServerUnreachable

HERE = Path(__file__).parent
RETRIED: list[str] = []


def retry_applies(item: pytest.Item) -> bool:
    """Only for browser tests in this folder (conftest hooks also see other folders' tests)."""
    return item.get_closest_marker("browser") is not None and item.path.is_relative_to(HERE)


def timeout_failure(excinfo: pytest.ExceptionInfo | None) -> bool:
    """Whether a failure is of the kind a retry may cure: a timeout, not a wrong answer."""
    if excinfo is None or excinfo.errisinstance(AssertionError):
        return False
    if excinfo.errisinstance((ApiServerNotReady, ServerUnreachable)):
        return True
    try:
        sync_api = importlib.import_module("playwright.sync_api")
    except ImportError:
        return False
    return excinfo.errisinstance(sync_api.TimeoutError)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if not retry_applies(item):
        return report
    report.timeout_failure = report.failed and timeout_failure(call.excinfo)
    server = (getattr(item, "funcargs", None) or {}).get("api_server")
    if report.failed and report.when == "call" and server is not None:
        report.sections.append(("api-server log (tail)", server.log()[-6000:]))
    return report


def pytest_runtest_protocol(item, nextitem):
    if not retry_applies(item):
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    failed = [report for report in reports if report.failed]
    if failed and all(report.timeout_failure for report in failed):
        first = "\n\n".join(f"{report.when}: {report.longreprtext}" for report in failed)
        errors = [line for line in failed[0].longreprtext.splitlines() if line.startswith("E ")] or ["?"]
        RETRIED.append(f"{item.nodeid} ({failed[0].when}): {errors[0][1:].strip()[:300]}")
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        for report in reports:
            report.sections.append(("first attempt (timed out; retried once)", first[-6000:]))
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_terminal_summary(terminalreporter):
    if RETRIED:
        terminalreporter.section("browser tests retried after a timeout")
        for line in RETRIED:
            terminalreporter.write_line(line)
