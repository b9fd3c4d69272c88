"""Which hosts a media download may reach: fal's, the connection's own, and the ones a user allows.

A result is the model's output, and a model may echo any URL it was given: downloading every
URL in it would let a prompt make the worker fetch an internal address
(``http://169.254.169.254/...``, ``http://127.0.0.1:8080/admin``) and store it under
``output_path``. So :class:`DownloadHosts` allows

* fal's media hosts (``fal.media``, ``fal.run``, ``fal.ai`` and their subdomains), over https;
* the hosts of the fal connection itself (``host:port`` exactly, any scheme), which is where the
  bundled emulator, or a fal stand-in, serves its files;
* the connection extra ``download_hosts``: a list (or comma-separated string) of host names,
  ``host:port``, ``*.example.com`` for a domain's subdomains, or ``*`` for any host; https
  only, unless the entry is written as ``http://host[:port]``.

Every redirect hop is checked again (see :mod:`media.download`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_fal.exceptions import FalConfigurationError, FalError

#: fal's own domains: results point at their CDN (``v3.fal.media``) and app hosts.
FAL_MEDIA_DOMAINS = ("fal.media", "fal.run", "fal.ai")


class FalDownloadRefusedError(FalError):
    """A media URL in a result points at a host downloads may not reach; nothing was fetched."""

    permanent = True


@dataclass(frozen=True)
class _Rule:
    host: str  # a host name, or "*.domain", or "*"
    port: int | None
    schemes: frozenset[str]

    def allows(self, scheme: str, host: str, port: int | None) -> bool:
        if scheme not in self.schemes or (self.port is not None and port != self.port):
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


@dataclass(frozen=True)
class DownloadHosts:
    """The hosts media may be downloaded from; :meth:`check` refuses every other URL."""

    rules: tuple[_Rule, ...]
    setting: str = "the fal connection's `download_hosts` extra"

    @classmethod
    def for_connection(cls, base_urls: Iterable[str], allowed: Iterable[str] = ()) -> DownloadHosts:
        """fal's hosts, the hosts of ``base_urls`` (the connection's run and queue URLs) and ``allowed``."""
        rules = [
            _Rule(pattern, None, frozenset({"https"}))
            for domain in FAL_MEDIA_DOMAINS
            for pattern in (domain, f"*.{domain}")
        ]
        for url in base_urls:
            parts = urlsplit(url)
            if parts.hostname:
                rules.append(_Rule(parts.hostname.lower(), _port(parts), frozenset({"http", "https"})))
        rules.extend(_parse_rule(entry) for entry in allowed)
        return cls(tuple(rules))

    def check(self, url: str) -> None:
        """Raise :class:`FalDownloadRefusedError` unless ``url`` may be downloaded."""
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        try:
            port = _port(parts)
        except ValueError:
            port = -1
        if scheme in ("http", "https") and host and any(rule.allows(scheme, host, port) for rule in self.rules):
            return
        shown = f"{scheme}://{host}{f':{parts.port}' if port not in (None, -1) and parts.port else ''}"
        raise FalDownloadRefusedError(
            f"Refusing to download {shown}/...: media are downloaded only from fal's hosts "
            f"({', '.join(FAL_MEDIA_DOMAINS)}, over https) and the fal connection's own host. A model may "
            f"echo a URL it was given; if this host is expected, add it to {self.setting} "
            f'(e.g. {{"download_hosts": ["{host or "media.example.com"}"]}}).'
        )


def _port(parts: Any) -> int | None:
    """The explicit port of a split URL, else the scheme's default."""
    if parts.port is not None:
        return parts.port
    return {"http": 80, "https": 443}.get(parts.scheme.lower())


def _parse_rule(entry: str) -> _Rule:
    text = entry.strip().lower()
    schemes = frozenset({"https"})
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme not in ("http", "https"):
            raise FalConfigurationError(
                f"download_hosts entry {entry!r}: only http:// or https:// hosts can be allowed."
            )
        schemes = frozenset({scheme})
    host, _, port_text = text.rstrip("/").partition(":")
    if not host or "/" in host or (port_text and not port_text.isdigit()):
        raise FalConfigurationError(
            f"download_hosts entry {entry!r} is not a host name: give 'media.example.com', "
            "'media.example.com:8443', '*.example.com', 'http://host:port' or '*'."
        )
    return _Rule(host, int(port_text) if port_text else None, schemes)


def parse_host_list(value: Any, field: str) -> tuple[str, ...]:
    """The ``download_hosts`` extra: a list of strings or one comma-separated string."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        entries = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(part, str) for part in value):
        entries = list(value)
    else:
        raise FalConfigurationError(f"{field} must be a list of host names or a comma-separated string, got {value!r}.")
    for entry in entries:
        try:
            _parse_rule(entry)
        except FalConfigurationError as error:
            raise FalConfigurationError(f"{field}: {error.message}") from None
    return tuple(entry.strip() for entry in entries)
