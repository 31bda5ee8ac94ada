"""The control token: the credential `POST` endpoints (rollback) require.

Without it any web page open on the coordinator's host could roll the fleet back with a form
post to 127.0.0.1. A browser cannot add an ``Authorization`` header to a cross-site request
without a CORS preflight, which the server never grants, so a bearer token in that header is
enough; the read-only endpoints stay open for Prometheus and curl.

Where the token comes from, first found wins: ``control_token`` in the config,
``control_token_file``, else the service makes a random one at every start and writes it to
``<state_dir>/control.token`` (mode 0600). Whoever may read the state directory may then roll
back with no configuration. The token is never logged.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from pathlib import Path

from fedasync_iot.coordinator._config import CoordinatorConfig
from fedasync_iot.models import ConfigError, StateError, atomic_write

log = logging.getLogger("fedasync.coordinator")

TOKEN_FILE = "control.token"  # noqa: S105 - a file name, not a secret


def configured_token(config: CoordinatorConfig) -> str | None:
    """The operator's own token (setting or file), or None if they left it to the service."""
    if config.control_token is not None:
        return config.control_token
    if config.control_token_file is not None:
        return _read(Path(config.control_token_file), "control_token_file")
    return None


def service_token(config: CoordinatorConfig) -> str:
    """The token the running service requires. Call it only while holding the state
    directory's lock: a generated token replaces the file a running service wrote."""
    token = configured_token(config)
    if token is not None:
        return token
    token = secrets.token_urlsafe(32)
    path = Path(config.state_dir) / TOKEN_FILE
    _write_private(path, token)
    log.info("control token generated for this run in %s (mode 0600)", path)
    return token


def client_token(config: CoordinatorConfig) -> str | None:
    """The token a local client presents: the configured one, else the service's file."""
    token = configured_token(config)
    if token is not None:
        return token
    path = Path(config.state_dir) / TOKEN_FILE
    if not path.exists():
        return None
    return _read(path, "the service's token file")


def token_matches(expected: str, header: str | None) -> bool:
    """Whether an ``Authorization`` header carries the token, in constant time."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def _read(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except PermissionError as exc:
        raise ConfigError(f"cannot read {what} {path}: permission denied; run as the "
                          "coordinator's user or set control_token_file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    if not token:
        raise ConfigError(f"{what} {path} is empty; put the control token in it")
    return token


def _write_private(path: Path, token: str) -> None:
    # Created 0600 from the start (no window where it is readable), written whole, then renamed
    # over the previous run's token: a reader sees the old token or the new, never half of one.
    try:
        atomic_write(path, token.encode() + b"\n", mode=0o600, fsync_dir=False)
    except OSError as exc:
        raise StateError(f"cannot write the control token to {path}: {exc}") from exc
