"""The coordinator's configuration: one frozen dataclass, loaded from TOML + FEDASYNC_* env."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedasync_iot.coordinator._central_dp import CentralDPConfig
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._participation import ParticipationConfig
from fedasync_iot.coordinator._rules import RuleConfig
from fedasync_iot.models import ConfigError, ModelSpec, bounds, check_broker, check_fields, load

_MIN_TOKEN = 16
_PLACEHOLDER_MODEL = ModelSpec(kind="linear", n_features=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotConfig:
    """How often the retained model snapshot is republished (exporting ONNX costs time)."""

    min_interval_s: float = field(default=1.0, metadata=bounds(ge=0))
    include_onnx: bool = True
    # Publish the retained model, its compact parts and the announcement again, unchanged, after
    # this long without a new version (0: never). A node of a clustered broker can keep an old
    # retained copy or miss one (NATS 2.9, docs/brokers.md); a fresh publication reaches it,
    # and every device listening there. One Mosquitto needs none.
    republish_s: float = field(default=0.0,
                               metadata=bounds(ge=0, rule="finite and >= 0 (0: never)"))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation of new versions: a file (NPZ/CSV) or ``builtin:digits``."""

    test_file: str | None = None
    every: int = field(default=1, metadata=bounds(ge=1, integer=True))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    model: ModelSpec
    # One URL, or several (the nodes of a clustered broker: a TOML array, or comma-separated
    # in FEDASYNC_BROKER / --broker): on a failure or a lost connection the next, round
    # robin (docs/brokers.md).
    broker: str | tuple[str, ...] = "mqtt://127.0.0.1:1883"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    fleet: str = "default"
    topic_root: str = "fl"
    # None: fedasync-coordinator-<topic_root>-<fleet> (`mqtt_client_id`). Two coordinators with
    # one client id take each other's broker session, and with it each other's updates.
    client_id: str | None = None
    standby: bool = False  # another coordinator serves the fleet: wait for it to stop (else exit)
    state_dir: str = "coordinator-state"
    keep_checkpoints: int = field(default=10, metadata=bounds(ge=1, integer=True))
    signing_key: str | None = None  # Ed25519 private key (PEM): sign every snapshot
    rule: RuleConfig = field(default_factory=RuleConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)  # coordinator/_central_dp
    batch_max: int = field(default=500, metadata=bounds(ge=1, integer=True))
    max_message_bytes: int = field(default=16 * 1024 * 1024,
                                   metadata=bounds(ge=1024, integer=True))
    http: str = "127.0.0.1:9464"  # metrics + status; "" turns it off; port 0 picks a free one
    # What POST /rollback requires (coordinator/_control.py); neither set: the service makes a
    # token at each start in <state_dir>/control.token.
    control_token: str | None = None
    control_token_file: str | None = None
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        check_broker(self.broker)
        check_fields(self)
        self.central_dp.check_rule(self.rule.name, memory_s=self.rule.memory_s)
        if self.client_id is not None and (not self.client_id or self.client_id != "".join(
                self.client_id.split())):
            raise ConfigError(f"client_id must be a non-empty name without spaces, got "
                              f"{self.client_id!r} (leave it unset for one derived from the "
                              "fleet)", key="client_id")
        if self.http and (":" not in self.http or not self.http.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(f"http must be HOST:PORT or empty, got {self.http!r}", key="http")
        if self.control_token is not None and self.control_token_file is not None:
            raise ConfigError("set control_token or control_token_file, not both",
                              key="control_token")
        if self.control_token is not None and (
                len(self.control_token) < _MIN_TOKEN or self.control_token != "".join(
                    self.control_token.split())):
            # Not echoed: it is a secret, and the error goes to logs.
            raise ConfigError(f"control_token must be at least {_MIN_TOKEN} characters without "
                              "spaces (e.g. `openssl rand -hex 32`)", key="control_token")
        if self.control_token_file is not None and not self.control_token_file.strip():
            raise ConfigError("control_token_file must name a file", key="control_token_file")

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"fedasync-coordinator-{self.topic_root}-{self.fleet}"

    @property
    def http_address(self) -> tuple[str, int] | None:
        if not self.http:
            return None
        host, port = self.http.rsplit(":", 1)
        return host, int(port)


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    stored_model: Callable[[Path], ModelSpec] | None = None,
) -> CoordinatorConfig:
    """Defaults < TOML file < FEDASYNC_* environment < `overrides` (the CLI's flags).

    `stored_model`, for the commands that read a state directory, supplies the model when no
    layer sets [model]: it gets the state directory the settings name and reads its spec."""
    def loaded(overrides: Mapping[str, Any] | None) -> CoordinatorConfig:
        return load(CoordinatorConfig, path, environ=environ, overrides=overrides,
                    required="model", hint="set [model] in the config file (kind, n_features, "
                                           "classes) or pass --model")

    try:
        return loaded(overrides)
    except ConfigError as exc:
        if stored_model is None or exc.key != "model":
            raise
    # No layer names a model, so one given last changes nothing else: it only lets the other
    # settings load, and with them the state directory whose stored model replaces it.
    located = loaded({**(overrides or {}), "model": _PLACEHOLDER_MODEL.to_dict()})
    return replace(located, model=stored_model(Path(located.state_dir)))
