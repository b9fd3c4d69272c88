"""A fal connection, read: the API key, URLs and defaults it holds, and the form that edits it.

Used by :class:`~airflow_provider_fal.hooks.fal.FalHook`; kept apart so that the hook itself is
only about handing out configured clients and running models.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_fal.core.billing import DEFAULT_API_URL
from airflow_provider_fal.core.bounded import DEFAULT_MAX_ANSWER_BYTES, DEFAULT_MAX_DOWNLOAD_BYTES, megabytes
from airflow_provider_fal.core.classify import secret_forms
from airflow_provider_fal.core.client import DEFAULT_QUEUE_URL, DEFAULT_RUN_URL
from airflow_provider_fal.core.validation import clean_api_key, validate_base_url
from airflow_provider_fal.exceptions import FalConfigurationError
from airflow_provider_fal.media.hosts import parse_host_list
from airflow_provider_fal.media.upload import (
    DEFAULT_CDN_URL,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_REST_URL,
    DEFAULT_UPLOAD_THRESHOLD,
    CdnUploader,
)

FAL_KEY_ENV = "FAL_KEY"
DEFAULT_CONN_ID = "fal_default"
#: Extras read from the connection (also declared as ``conn-fields`` for the UI form).
EXTRA_QUEUE_URL = "queue_url"
EXTRA_TIMEOUT = "timeout"
EXTRA_START_TIMEOUT = "start_timeout"
#: Extras set in the connection's Extra JSON only (no form field): the media hosts downloads may
#: also come from, and the size caps of an answer and of a downloaded file, in MiB.
EXTRA_DOWNLOAD_HOSTS = "download_hosts"
EXTRA_API_URL = "api_url"
EXTRA_MAX_ANSWER_MB = "max_answer_mb"
EXTRA_MAX_DOWNLOAD_MB = "max_download_mb"
#: Input uploads to fal's CDN (see :mod:`media.upload`): fal's REST and CDN hosts (the emulator
#: stands in for both), files above ``upload_threshold_kb`` KiB are uploaded (``"never"``: always
#: data: URIs), and no file above ``max_upload_mb`` MiB is.
EXTRA_REST_URL = "rest_url"
EXTRA_CDN_URL = "cdn_url"
EXTRA_UPLOAD_THRESHOLD_KB = "upload_threshold_kb"
EXTRA_MAX_UPLOAD_MB = "max_upload_mb"


def mask_key(secret: str) -> None:
    """Register a key with Airflow's log masker (a no-op where none is configured), in every
    form a server may reflect it (URL-encoded, base64 of ``Key <key>``: see ``secret_forms``)."""
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # Airflow 3.0
        from airflow.sdk.execution_time.secrets_masker import mask_secret
    mask_secret(list(secret_forms(secret)))


def how_to_create(conn_id: str) -> str:
    """The three ways to create a fal connection, for error messages."""
    env = f"AIRFLOW_CONN_{conn_id.upper()}"
    return (
        f"Create it in the Airflow UI (Admin -> Connections, type 'fal', API key in 'API Key'), with "
        f"`airflow connections add {conn_id} --conn-type fal --conn-password <FAL_KEY>`, or set "
        f'{env}=\'{{"conn_type": "fal", "password": "<FAL_KEY>"}}\'.'
    )


@dataclass(frozen=True)
class FalConnectionSettings:
    """What a fal connection resolves to. The key is kept out of ``repr``."""

    api_key: str = field(repr=False)
    run_url: str = DEFAULT_RUN_URL
    queue_url: str = DEFAULT_QUEUE_URL
    timeout: Any = None
    start_timeout: Any = None
    download_hosts: tuple[str, ...] = ()
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES
    #: fal's Platform API (pricing), e.g. the emulator's own host
    api_url: str = DEFAULT_API_URL
    rest_url: str = DEFAULT_REST_URL
    cdn_url: str = DEFAULT_CDN_URL
    upload_threshold: int | None = DEFAULT_UPLOAD_THRESHOLD
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES


def settings_from_connection(conn: Any, conn_id: str) -> FalConnectionSettings:
    """What the connection ``conn`` (an Airflow ``Connection``) holds; its key is registered with the masker."""
    if not conn.password or not conn.password.strip():
        raise FalConfigurationError(
            f"The fal connection {conn_id!r} has no API key in its password ('API Key') field. {how_to_create(conn_id)}"
        )
    source = f"the fal connection {conn_id!r}"
    mask_key(conn.password.strip())  # before it is checked: even a refused key stays out of the logs
    password = clean_api_key(conn.password, source)
    login = conn.login.strip() if conn.login else ""
    api_key = clean_api_key(f"{login}:{password}", f"{source} (login and password)") if login else password
    if api_key != password:
        mask_key(api_key)
    extras = conn.extra_dejson or {}
    return FalConnectionSettings(
        api_key=api_key,
        run_url=_base_url(conn) or DEFAULT_RUN_URL,
        queue_url=extras.get(EXTRA_QUEUE_URL) or DEFAULT_QUEUE_URL,
        timeout=_blank_to_none(extras.get(EXTRA_TIMEOUT)),
        start_timeout=_blank_to_none(extras.get(EXTRA_START_TIMEOUT)),
        download_hosts=parse_host_list(
            extras.get(EXTRA_DOWNLOAD_HOSTS), f"the {EXTRA_DOWNLOAD_HOSTS!r} extra of connection {conn_id!r}"
        ),
        max_answer_bytes=megabytes(
            extras.get(EXTRA_MAX_ANSWER_MB), f"the {EXTRA_MAX_ANSWER_MB!r} extra of connection {conn_id!r}"
        )
        or DEFAULT_MAX_ANSWER_BYTES,
        max_download_bytes=megabytes(
            extras.get(EXTRA_MAX_DOWNLOAD_MB), f"the {EXTRA_MAX_DOWNLOAD_MB!r} extra of connection {conn_id!r}"
        )
        or DEFAULT_MAX_DOWNLOAD_BYTES,
        api_url=validate_base_url(
            extras.get(EXTRA_API_URL) or DEFAULT_API_URL, f"the {EXTRA_API_URL!r} extra of connection {conn_id!r}"
        ),
        rest_url=extras.get(EXTRA_REST_URL) or DEFAULT_REST_URL,
        cdn_url=extras.get(EXTRA_CDN_URL) or DEFAULT_CDN_URL,
        upload_threshold=_threshold(extras.get(EXTRA_UPLOAD_THRESHOLD_KB), conn_id),
        max_upload_bytes=megabytes(
            extras.get(EXTRA_MAX_UPLOAD_MB), f"the {EXTRA_MAX_UPLOAD_MB!r} extra of connection {conn_id!r}"
        )
        or DEFAULT_MAX_UPLOAD_BYTES,
    )


def _threshold(value: Any, conn_id: str) -> int | None:
    """``upload_threshold_kb`` in bytes: KiB >= 0, ``"never"`` (None: no uploads), blank: the default."""
    if value is None or value == "":
        return DEFAULT_UPLOAD_THRESHOLD
    if isinstance(value, str) and value.strip().lower() == "never":
        return None
    try:
        kib = float(str(value).strip())
    except ValueError:
        kib = float("nan")
    if not 0 <= kib <= 10 * 1024 * 1024:  # NaN fails too
        raise FalConfigurationError(
            f"the {EXTRA_UPLOAD_THRESHOLD_KB!r} extra of connection {conn_id!r} must be a number of KiB "
            f'(0 to 10485760) or "never", got {value!r}.'
        )
    return int(kib * 1024)


def cdn_uploader(settings: FalConnectionSettings, retry_policy: Any, timeout: Any, log: logging.Logger) -> CdnUploader:
    """The CDN uploader of a connection: its REST/CDN hosts, and its own hosts trusted over http."""
    return CdnUploader(
        settings.api_key,
        rest_url=settings.rest_url,
        cdn_url=settings.cdn_url,
        own_hosts=(settings.run_url, settings.queue_url),
        retry_policy=retry_policy,
        timeout=timeout,
        max_upload_bytes=settings.max_upload_bytes,
        logger=log,
        on_secret=mask_key,
    )


def settings_without_connection(conn_id: str, log: logging.Logger) -> FalConnectionSettings:
    """A missing connection: the ``FAL_KEY`` fallback for the default one (as fal's client does), else a clear error."""
    env_key = os.environ.get(FAL_KEY_ENV)
    if conn_id == DEFAULT_CONN_ID and env_key and env_key.strip():
        log.info("fal connection %r not found; using the %s environment variable.", conn_id, FAL_KEY_ENV)
        mask_key(env_key.strip())
        api_key = clean_api_key(env_key, f"the {FAL_KEY_ENV} environment variable (used for {conn_id!r})")
        return FalConnectionSettings(api_key=api_key)
    raise FalConfigurationError(f"The fal connection {conn_id!r} does not exist. {how_to_create(conn_id)}")


def ui_field_behaviour() -> dict[str, Any]:
    """Form behaviour for Airflow UIs that ask the hook (before 3.2): the provider info's, snake_cased."""
    from airflow_provider_fal.get_provider_info import fal_connection_form

    behaviour = fal_connection_form()["ui-field-behaviour"]
    return {
        "hidden_fields": list(behaviour["hidden-fields"]),
        "relabeling": dict(behaviour["relabeling"]),
        "placeholders": dict(behaviour["placeholders"]),
    }


def connection_form_widgets() -> dict[str, Any]:
    """The provider info's ``conn-fields`` as WTForms fields, for Airflow UIs before 3.2.

    Only WTForms is needed (Airflow 3.0/3.1 swap in their own field classes while reading
    them); Flask-AppBuilder widgets and Babel are not, as no Airflow 3 form renders with them.
    """
    try:
        from wtforms import StringField
    except ImportError:
        return {}
    from airflow_provider_fal.get_provider_info import fal_connection_form

    return {
        name: StringField(spec["label"], description=spec.get("description", ""))
        for name, spec in fal_connection_form()["conn-fields"].items()
    }


def _base_url(conn: Any) -> str | None:
    """The connection's host as a base URL; a bare host name gets https (or its schema)."""
    if not conn.host:
        return None
    if "://" in conn.host or conn.host.strip().lower().startswith(("http:", "https:")):
        return conn.host  # a whole URL, or a malformed one ('http:/host') for the client to reject
    scheme = conn.schema if conn.schema in ("http", "https") else "https"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{conn.host}{port}"


def _blank_to_none(value: Any) -> Any:
    return None if value in (None, "") else value
