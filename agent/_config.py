"""The agent's configuration: one frozen dataclass from TOML + FEDASYNC_* env + flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedasync_iot.agent._hooks import COMMAND_PREFIX, check_spec, command_argv
from fedasync_iot.agent._policy import PolicyConfig
from fedasync_iot.agent._privacy import PrivacyConfig
from fedasync_iot.agent._resend import ResendConfig
from fedasync_iot.agent._trainer import TrainConfig
from fedasync_iot.models import (
    NAME_RULE,
    ConfigError,
    bounds,
    check_broker,
    check_fields,
    is_valid_id,
    load,
)

# How the broker holds a device's session (AgentConfig.session).
Session = Literal["sessionless", "persistent"]

_COUNT_0 = bounds(ge=0, integer=True, rule="a non-negative integer")
_SECONDS = bounds(ge=0, rule="a non-negative number of seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    device_id: str
    # One URL, or several (the nodes of a clustered broker: a TOML array, or comma-separated
    # in FEDASYNC_BROKER / --broker): on a failure or a lost connection the next, round
    # robin (docs/brokers.md).
    broker: str | tuple[str, ...] = "mqtt://127.0.0.1:1883"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # "sessionless": the broker keeps nothing for this device between connections (clean
    # session, acks and models at QoS 0); an update with no ack is sent again after a timeout
    # that follows the measured acks ([resend]). "persistent": the broker keeps the device's
    # session and queues its acks while it is away (QoS 1). docs/brokers.md, "Device sessions".
    session: Session = "sessionless"
    resend: ResendConfig = field(default_factory=ResendConfig)
    fleet: str = "default"
    topic_root: str = "fl"
    state_dir: str = "agent-state"
    data: str = "data"  # a directory/file of CSV or NPZ, or module:function
    label_column: str = "label"
    min_samples: int = field(default=10, metadata=_COUNT_0)  # never train on less
    # New local samples that justify training on the same model.
    min_new_samples: int = field(default=50, metadata=_COUNT_0)
    retrain_on_new_model: bool = True  # a newer global model alone justifies training
    min_train_interval_s: float = field(default=60.0, metadata=_SECONDS)
    check_interval_s: float = field(default=15.0, metadata=_SECONDS)
    # Models on demand (docs/architecture.md): the full snapshot is fetched when the agent is
    # about to train on a newer version, or when its inference model was last checked this long
    # ago. 0 follows every version as it is published.
    model_refresh_s: float = field(default=3600.0, metadata=_SECONDS)
    # A metered network (no interface the policy allows is up) fetches nothing unless true.
    fetch_on_metered: bool = False
    spool_max_count: int = field(default=100, metadata=bounds(ge=1, integer=True))
    spool_max_bytes: int = field(default=64 * 1024 * 1024, metadata=bounds(ge=1, integer=True))
    train_in_subprocess: bool = True
    # The coordinator's Ed25519 public key(s) (PEM files). When set, a model that is not signed
    # by one of them is refused and the previous model kept.
    coordinator_public_keys: tuple[str, ...] = ()
    # Site control (agent/_hooks.py; docs/operations.md, "Site control hooks").
    # More eligibility checks, each "package.module:function" called with the device's Readings.
    eligibility_hooks: tuple[str, ...] = ()
    # Asked before a finished update is spooled: "package.module:function" or
    # "cmd:/path/to/program args..." (metadata as JSON on stdin; exit status 0 approves).
    approval_hook: str | None = None
    # A command still running then is killed: a refusal.
    approval_timeout_s: float = field(default=30.0, metadata=bounds(
        gt=0, rule="a positive number of seconds"))
    # A refused update is deleted ("drop") or kept in <state_dir>/held ("keep") until an
    # operator releases or drops it (fedasync-agent held ...). Never sent either way.
    on_refused: Literal["keep", "drop"] = "drop"
    training: TrainConfig = field(default_factory=TrainConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # The lifetime differential-privacy budget (agent/_privacy.py; docs/privacy.md).
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        check_broker(self.broker)
        if not is_valid_id(self.device_id):
            raise ConfigError(f"device_id must be {NAME_RULE}", key="device_id")
        check_fields(self)
        if not isinstance(self.fetch_on_metered, bool):
            raise ConfigError(f"fetch_on_metered must be true or false, got "
                              f"{self.fetch_on_metered!r}", key="fetch_on_metered")
        if self.session not in ("sessionless", "persistent"):
            raise ConfigError(f'session must be "sessionless" or "persistent", got '
                              f"{self.session!r}", key="session")
        self._check_site_control()
        if self.privacy.epsilon_budget is not None and self.training.noise_multiplier <= 0:
            raise ConfigError("privacy.epsilon_budget needs training.noise_multiplier > 0: an "
                              "update without noise spends an unbounded epsilon, so none "
                              "could be sent", key="epsilon_budget")

    def _check_site_control(self) -> None:
        """Syntax only: importing the hooks is the agent's job when it starts (`agent._hooks`)."""
        hooks = self.eligibility_hooks
        if isinstance(hooks, str):  # FEDASYNC_ELIGIBILITY_HOOKS=site:fn, one hook without [...]
            hooks = (hooks,)
            object.__setattr__(self, "eligibility_hooks", hooks)
        if not isinstance(hooks, tuple):
            raise ConfigError(f"eligibility_hooks must be a list of package.module:function, "
                              f"got {hooks!r}", key="eligibility_hooks")
        for spec in hooks:
            check_spec(spec, key="eligibility_hooks")
        if len(set(hooks)) != len(hooks):
            raise ConfigError("eligibility_hooks lists a hook twice", key="eligibility_hooks")
        hook = self.approval_hook
        if isinstance(hook, str) and hook.startswith(COMMAND_PREFIX):
            command_argv(hook)
        elif hook is not None:
            check_spec(hook, key="approval_hook", alternative=f" or {COMMAND_PREFIX}program args")
        if self.on_refused not in ("keep", "drop"):
            raise ConfigError(f'on_refused must be "keep" or "drop", got {self.on_refused!r}',
                              key="on_refused")


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    return load(AgentConfig, path, environ=environ, overrides=overrides, required="device_id",
                hint="set device_id in the config, FEDASYNC_DEVICE_ID, or --device-id")
