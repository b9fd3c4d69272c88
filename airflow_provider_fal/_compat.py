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

try:  # Airflow >= 3.1
    from airflow.sdk.exceptions import AirflowTaskTimeout
except ImportError:  # Airflow 3.0
    from airflow.exceptions import AirflowTaskTimeout  # type: ignore[no-redef,attr-defined]

try:  # Airflow >= 3.1
    from airflow.sdk.configuration import conf
except ImportError:  # Airflow 3.0
    from airflow.configuration import conf  # type: ignore[no-redef]

from airflow.sdk import BaseOperator, Context

__all__ = ["AirflowFailException", "AirflowTaskTimeout", "BaseHook", "BaseOperator", "Context", "conf"]
