"""The model the agent holds, saved in its state directory, and the templates it cached.

``state_dir/model.snapshot`` is the frame of the newest model taken (full or compact), read
back at start and by `agent.Predictor`; ``state_dir/templates/<id>.template`` are verified
template frames, by template id, which a compact snapshot needs to become an ONNX model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedasync_iot.models import (
    Snapshot,
    TemplateMessage,
    WireError,
    atomic_write,
    decode_snapshot,
    decode_template,
    decode_weights,
    frame_kind,
)

log = logging.getLogger("fedasync.agent")

SNAPSHOT_FILE = "model.snapshot"
TEMPLATES_DIR = "templates"  # under state_dir: <template id>.template, verified frames


class ModelCache:
    """The model held (`snapshot`, kept on disk by `keep`) and the templates cached by id."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SNAPSHOT_FILE
        self.templates_dir = state_dir / TEMPLATES_DIR
        self.snapshot: Snapshot | None = None

    def load(self) -> None:
        """Hold the saved model, if there is one that decodes."""
        if self.path.exists():
            try:
                self.snapshot = decode_saved(self.path.read_bytes())
                log.info("loaded saved model version %d", self.snapshot.version)
            except (OSError, WireError) as exc:
                log.warning("ignored the saved model: %s", exc)

    def keep(self, snapshot: Snapshot, frame: bytes) -> None:
        """Hold `snapshot` from now on; `frame` (verified) is what is saved."""
        self.snapshot = snapshot
        atomic_write(self.path, frame, fsync_dir=False)

    def template(self, template_id: str) -> TemplateMessage | None:
        """The cached template `template_id`, None when missing or unreadable (fetched again)."""
        return load_template(self.templates_dir, template_id)

    def keep_template(self, template_id: str, frame: bytes) -> None:
        self.templates_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.templates_dir / f"{template_id}.template", frame, fsync_dir=False)


def decode_saved(data: bytes) -> Snapshot:
    """The snapshot in a saved ``model.snapshot``: a full snapshot or a compact one (weights)."""
    if frame_kind(data) == "weights":
        return decode_weights(data).snapshot()
    return decode_snapshot(data)


def load_template(directory: Path, template_id: str) -> TemplateMessage | None:
    """The template `template_id` cached in `directory`, None when missing or unreadable."""
    path = directory / f"{template_id}.template"
    try:
        template = decode_template(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, WireError) as exc:
        log.warning("ignored the cached model template %s: %s", path, exc)
        return None
    if template.id != template_id:
        log.warning("ignored the cached model template %s: it holds %s", path, template.id)
        return None
    return template
