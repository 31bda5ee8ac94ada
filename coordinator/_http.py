"""Metrics (Prometheus text), status (JSON) and rollback over HTTP.

Reading is open (GET /metrics, /status, /devices, /healthz: 503 with the reason while the
coordinator does not serve its fleet); changing (POST /rollback) needs
``Authorization: Bearer <control token>`` (coordinator/_control.py). Still bind it to loopback
or a management network: it is plain HTTP, and the token crosses it in the clear.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fedasync_iot.coordinator._control import token_matches
from fedasync_iot.coordinator._lock import StateLock
from fedasync_iot.models import FedAsyncError

log = logging.getLogger("fedasync.coordinator.http")


class Rollback(NamedTuple):
    """A rollback done (durably): the new version, and whether the broker has it yet."""

    version: int
    published: bool
    detail: str = ""


class Service(Protocol):
    """What the endpoints read and change (the coordinator service)."""

    def status(self) -> dict[str, Any]: ...
    def devices(self) -> dict[str, Any]: ...
    def health(self) -> tuple[bool, str | None]: ...
    def rollback(self, to_version: int) -> Rollback: ...


class StatusServer:
    """Serves `service` on `address`; `lock` (the state directory's, held by the service) is
    where it notes its address for `fedasync-coordinator rollback`."""

    def __init__(self, address: tuple[str, int], service: Service, *, token: str,
                 registry: CollectorRegistry, lock: StateLock | None) -> None:
        handler = type("Handler", (_Handler,),
                       {"service": service, "token": token, "registry": registry})
        self._server = ThreadingHTTPServer(address, handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="coordinator-http", daemon=True)
        self._lock = lock

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        if self._lock is not None:  # where `rollback` finds this service: see cli._rollback
            host, port = self.address
            self._lock.note_control(f"{host}:{port}")

    def stop(self) -> None:
        if self._lock is not None and self._lock.held:
            self._lock.note_control(None)
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    service: Service
    token: str
    registry: CollectorRegistry

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path in ("/status", "/"):
            self._json(200, self.service.status())
        elif path == "/devices":
            self._json(200, self.service.devices())
        elif path == "/healthz":
            # 200 only while it serves the fleet: connected, committing, not refused.
            ok, reason = self.service.health()
            if ok:
                self._json(200, {"ok": True})
            else:
                self._json(503, {"ok": False, "reason": reason})
        else:
            self._json(404, {"error": "not found",
                             "paths": ["/metrics", "/status", "/devices", "/healthz"]})

    def do_POST(self) -> None:
        if not token_matches(self.token, self.headers.get("Authorization")):
            log.warning("refused POST %s from %s: no valid control token",
                        urlsplit(self.path).path, self.client_address[0])
            self._json(401, {"error": "this needs the control token: send 'Authorization: "
                                      "Bearer <token>' (control_token, control_token_file or "
                                      "<state_dir>/control.token)"},
                       headers={"WWW-Authenticate": "Bearer"})
            return
        parts = urlsplit(self.path)
        if parts.path != "/rollback":
            self._json(404, {"error": "not found"})
            return
        try:
            to = int(parse_qs(parts.query)["to"][0])
            done = self.service.rollback(to)
        except (KeyError, ValueError):
            self._json(400, {"error": "use POST /rollback?to=VERSION"})
        except FedAsyncError as exc:
            self._json(409, {"error": str(exc)})
        else:
            self._json(200, {"version": done.version, "rolled_back_to": to,
                             "published": done.published, "detail": done.detail})

    def _json(self, code: int, body: Any, *, headers: dict[str, str] | None = None) -> None:
        self._reply(code, json.dumps(body, indent=1).encode(), "application/json", headers)

    def _reply(self, code: int, body: bytes, content_type: str,
               headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)
