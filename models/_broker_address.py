"""Broker addresses: ``mqtt[s]://[user[:pass]@]host[:port]``, one URL or several.

A broker setting may name several URLs (the nodes of a clustered broker: a TOML array, or
comma-separated text): the connection then fails over between them, round robin
(docs/brokers.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit

from fedasync_iot.models._errors import ConfigError

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Several URLs in one text: split at a comma that starts another URL (scheme://), so that a
# comma inside a password stays (it would better be percent-encoded as %2C anyway).
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def broker_urls(setting: str | Sequence[str]) -> tuple[str, ...]:
    """The URLs of a broker setting: one URL, comma-separated URLs, or a list of URLs."""
    if isinstance(setting, str):
        return tuple(u for u in _URL_SEPARATOR.split(setting.strip()) if u)
    return tuple(u.strip() for u in setting)


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerAddress:
    """Where the broker is and how to log in: parsed from ``mqtt[s]://[user[:pass]@]host[:port]``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Further nodes to fail over to (the URLs after the first of a broker setting).
    alternates: tuple[BrokerAddress, ...] = ()

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("broker host is empty", key="broker")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port {self.port} out of range", key="broker")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs both cert_file and key_file")

    @classmethod
    def parse(
        cls,
        url: str | Sequence[str],
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> BrokerAddress:
        """One address from ``mqtt[s]://...``; from several URLs (a list, or comma-separated)
        the first, with the others as its `alternates`, all of one scheme (one client has TLS
        or not)."""
        urls = broker_urls(url)
        if not urls:
            raise ConfigError("no broker URL", key="broker")
        if len(urls) > 1:
            first, *rest = (cls.parse(u, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
                            for u in urls)
            if any(a.tls != first.tls for a in rest):
                raise ConfigError("broker URLs mix mqtt:// and mqtts://: use one scheme for "
                                  "all of them", key="broker")
            if len({(a.host, a.port) for a in (first, *rest)}) != len(urls):
                raise ConfigError(f"a broker URL is listed twice: {', '.join(urls)}",
                                  key="broker")
            return replace(first, alternates=tuple(rest))
        parts = urlsplit(urls[0])
        url = urls[0]
        if parts.scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}",
                              key="broker")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ConfigError(f"bad port in broker URL {url!r}", key="broker") from exc
        if parts.netloc.endswith(":"):  # "host:" is a port left out, not a wish for the default
            raise ConfigError(f"empty port in broker URL {url!r}: give one, or leave out the ':' "
                              f"for the default {port}", key="broker")
        return cls(
            host=parts.hostname or "",
            port=port,
            tls=parts.scheme == "mqtts",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )

    def redacted(self) -> str:
        """The URL for logs: never print a password."""
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def candidates(self) -> tuple[BrokerAddress, ...]:
        """Every address to try, in order: this one, then its alternates."""
        return (replace(self, alternates=()), *self.alternates)


def check_broker(setting: str | Sequence[str]) -> None:
    """A broker setting names at least one URL, each a string (parsed when connecting)."""
    if not isinstance(setting, str) and not all(isinstance(u, str) for u in setting):
        raise ConfigError(f"broker must be a URL or a list of URLs, got {setting!r}",
                          key="broker")
    if not broker_urls(setting) or not all(broker_urls(setting)):
        raise ConfigError("broker names no URL (e.g. \"mqtt://127.0.0.1:1883\", or a list of "
                          "them)", key="broker")
