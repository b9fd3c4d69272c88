"""Fixtures of the system tests: one real deployment per session (tests/system/deployment.py).

They need the ``system`` extra (``pip install -e ".[test,system]"``; ``make system-test`` sets it
up) and PostgreSQL and Redis on the machine, installed with apt-get when missing and allowed.
Without them every test here is skipped, with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time

import pytest

from tests.conftest import API_KEY

NEEDED = ("airflow.providers.celery", "airflow.providers.amazon", "s3fs", "moto", "psycopg2", "boto3")


def _missing_modules() -> list[str]:
    missing = []
    for name in NEEDED:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


def _skip(reason: str) -> None:
    """Skip, or fail under ``make system-test`` (``FAL_SYSTEM_TESTS_REQUIRED=1``), where a skip would hide it."""
    if os.environ.get("FAL_SYSTEM_TESTS_REQUIRED"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def deployment(request):
    missing = _missing_modules()
    if missing:
        _skip(f"the system extra is not installed (missing {', '.join(missing)}): make system-test")
    from tests.system.services import ensure_packages

    problem = ensure_packages()
    if problem:
        _skip(problem)
    from tests.system.deployment import Deployment

    deployment = Deployment(API_KEY)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()
    if request.session.testsfailed:  # kept for reading
        print(f"\nsystem deployment logs kept in {deployment.workdir}")
    else:
        shutil.rmtree(deployment.workdir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed system test's report ends with the tail of each service's and component's log."""
    outcome = yield
    report = outcome.get_result()
    deployment = getattr(item, "funcargs", {}).get("deployment")
    if report.failed and report.when == "call" and deployment is not None:
        from tests.system.services import log_tails

        report.sections.append(
            ("deployment log tails", f"(full logs in {deployment.workdir})\n{log_tails(deployment.workdir)}")
        )


@pytest.fixture
def emulator(deployment):
    """The deployment's emulator, reset (timing, faults, request log) before each test."""
    deployment.emulator.control("reset", {})
    return deployment.emulator


def wait_for(condition, timeout: float = 60.0, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return bool(result)
