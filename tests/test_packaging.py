"""The installed distribution adds exactly one top-level import name, `fedasync_iot`, and every
part of it (issue 25): read from the RECORD of a real `pip install .`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("agent", "coordinator", "models", "fleet", "bench")


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    target = tmp_path_factory.mktemp("site")
    # Offline: the dev install carries the setuptools the build needs (pyproject's dev extra).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-compile", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (info,) = target.glob("fedasync_iot-*.dist-info")
    return [line.split(",")[0] for line in (info / "RECORD").read_text().splitlines() if line]


def test_one_top_level_import_name(record: list[str]) -> None:
    # Console scripts sit outside site-packages ("../../bin/..."); dist-info is metadata.
    tops = {path.split("/")[0] for path in record
            if not path.startswith("..") and ".dist-info/" not in path}
    assert tops == {"fedasync_iot"}


def test_every_part_installed_under_it(record: list[str]) -> None:
    files = set(record)
    for part in PARTS:
        sources = {f"fedasync_iot/{p.relative_to(ROOT).as_posix()}"
                   for p in (ROOT / part).rglob("*.py")}
        assert sources <= files, sorted(sources - files)
        assert f"fedasync_iot/{part}/py.typed" in files
    assert "fedasync_iot/py.typed" in files
    assert "fedasync_iot/models/ml/py.typed" in files
    scripts = {Path(p).name for p in record if p.startswith("..")}
    assert {"fedasync-agent", "fedasync-coordinator", "fedasync-sim"} <= scripts
