"""fedasync-sim stopped by SIGTERM (kill, timeout, systemd) leaves nothing running."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil


def test_sigterm_ends_a_run_and_leaves_nothing_running(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedasync_iot.fleet.cli",
         "run", "--rule", "fedasync", "--devices", "4",
         "--workers", "1", "--duration", "3600", "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    stderr = proc.stderr
    assert stderr is not None

    def read() -> None:
        for line in stderr:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        port = None
        while port is None:  # the run has started its broker (and its worker)
            found = re.search(r"private Mosquitto at mqtt://127\.0\.0\.1:(\d+)",
                              lines.get(timeout=120))
            port = int(found.group(1)) if found else None
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("mosquitto" in c.name() for c in children)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"left running: {[p.name() for p in alive]}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the private broker is gone
    reader.join(timeout=30)  # to the end of its output
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert any("interrupted; nothing is left running" in x for x in rest)
