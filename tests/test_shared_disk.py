"""Which executor a task runs under, and whether its workers share the local disk."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from airflow_provider_fal.operators.shared_disk import is_local_executor, task_executor, warn_if_disk_not_shared


@pytest.mark.parametrize(
    ("setting", "local"),
    [
        ("LocalExecutor", True),
        ("SequentialExecutor", True),
        ("airflow.executors.local_executor.LocalExecutor", True),
        ("my_local:airflow.executors.local_executor.LocalExecutor", True),
        ("CeleryExecutor", False),
        ("KubernetesExecutor", False),
        ("airflow.providers.edge3.executors.EdgeExecutor", False),
        ("my_celery:airflow.providers.celery.executors.celery_executor.CeleryExecutor", False),
    ],
)
def test_executor_settings_in_every_form(setting, local):
    assert is_local_executor(setting) is local


def test_the_tasks_own_executor_wins_over_the_default(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor,LocalExecutor")
    assert task_executor(SimpleNamespace(executor=None)) == "CeleryExecutor"  # the first configured is the default
    assert task_executor(SimpleNamespace(executor="LocalExecutor")) == "LocalExecutor"


def test_one_warning_names_the_fields_and_nothing_without_local_paths(monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "KubernetesExecutor")
    logger = logging.getLogger("test_shared_disk")
    task = SimpleNamespace(executor=None)
    with caplog.at_level(logging.WARNING, logger="test_shared_disk"):
        assert warn_if_disk_not_shared(task, [], logger) is False
        assert warn_if_disk_not_shared(task, ["output_path"], logger) is True
    [record] = caplog.records
    assert record.getMessage().startswith("Local paths in output_path, but this task runs under KubernetesExecutor")
