"""What arrives on the model topics, verified and decoded: a full snapshot (model topic), a
compact one (weights topic: it needs the cached template it names) or a template."""

from __future__ import annotations

from fedasync_iot.agent._model_cache import ModelCache
from fedasync_iot.models import (
    Snapshot,
    TemplateMessage,
    Verifier,
    WireError,
    decode_snapshot,
    decode_template,
    decode_weights,
    split_signature,
)


class NoTemplate(Exception):
    """Compact weights arrived whose template is not cached (yet): fetch it, refuse nothing."""


class Receipt:
    """Checks the coordinator's signature (when keys are configured) and decodes. Each method
    returns the decoded message and its verified frame (what is saved), or raises WireError."""

    def __init__(self, cache: ModelCache, public_keys: tuple[str, ...]) -> None:
        self.cache = cache
        self.verifier = (Verifier.from_files(list(public_keys)) if public_keys
                         else None)

    def verified(self, payload: bytes) -> bytes:
        return (self.verifier.verify(payload) if self.verifier is not None
                else split_signature(payload)[0])

    def full(self, payload: bytes) -> tuple[Snapshot, bytes]:
        frame = self.verified(payload)
        return decode_snapshot(frame), frame

    def compact(self, payload: bytes) -> tuple[Snapshot, bytes]:
        """Trained from as float32, predicted with through the cached template it names."""
        frame = self.verified(payload)
        weights = decode_weights(frame)
        template = self.cache.template(weights.template_id)
        if template is None:
            raise NoTemplate(weights.template_id)
        if template.spec != weights.spec or template.template.n_params != weights.weights.size:
            raise WireError(f"weights of version {weights.version} do not fit their template "
                            f"{weights.template_id[:12]} (another spec or size)")
        return weights.snapshot(), frame

    def template(self, payload: bytes) -> tuple[TemplateMessage, bytes]:
        frame = self.verified(payload)
        return decode_template(frame), frame
