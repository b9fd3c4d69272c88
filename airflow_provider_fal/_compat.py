"""Imports that moved between Airflow 3.0 and 3.3, resolved once here."""

from __future__ import annotations

try:  # Airflow >= 3.1
    from airflow.sdk import BaseHook
except ImportError:  # Airflow 3.0
    from airflow.hooks.base import BaseHook  # type: ignore[no-redef]

try:  # Airflow >= 3.1
    from airflow.sdk.exceptions import AirflowFailException
except ImportError:  # Airflow 3.0
    from airflow.exceptions import AirflowFailException  # type: ignore[no-redef,attr-defined]

from airflow.sdk import BaseOperator, Context

__all__ = ["AirflowFailException", "BaseHook", "BaseOperator", "Context"]
