"""Metrics (Prometheus text), status (JSON) and rollback over HTTP. Bind it to loopback or a
management network: it has no authentication of its own."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models import FedAsyncError

if TYPE_CHECKING:
    from coordinator._service import CoordinatorService

log = logging.getLogger("fedasync.coordinator.http")


class StatusServer:
    def __init__(self, address: tuple[str, int], service: CoordinatorService) -> None:
        handler = type("Handler", (_Handler,), {"service": service})
        self._server = ThreadingHTTPServer(address, handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="coordinator-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    service: CoordinatorService

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._reply(200, generate_latest(self.service.metrics.registry), CONTENT_TYPE_LATEST)
        elif path in ("/status", "/"):
            self._json(200, self.service.status())
        elif path == "/devices":
            self._json(200, self.service.devices())
        elif path == "/healthz":
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": "not found",
                             "paths": ["/metrics", "/status", "/devices", "/healthz"]})

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/rollback":
            self._json(404, {"error": "not found"})
            return
        try:
            to = int(parse_qs(parts.query)["to"][0])
            version = self.service.rollback(to)
        except (KeyError, ValueError):
            self._json(400, {"error": "use POST /rollback?to=VERSION"})
        except FedAsyncError as exc:
            self._json(409, {"error": str(exc)})
        else:
            self._json(200, {"version": version, "rolled_back_to": to})

    def _json(self, code: int, body: Any) -> None:
        self._reply(code, json.dumps(body, indent=1).encode(), "application/json")

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)
