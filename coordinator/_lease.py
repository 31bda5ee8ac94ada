"""One coordinator per fleet and broker (docs/architecture.md, Coordinator identity).

Its client id derives from the fleet, and before each connection attempt it looks at the
fleet's retained coordinator status (coordinator/_identity.py). Another live instance there
means: exit (or, with `standby`, wait for it to go offline), never connect with the same client
id and take its session, and with it the fleet's updates, back and forth.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fedasync_iot.coordinator._config import CoordinatorConfig
from fedasync_iot.coordinator._identity import Identity, LookTimeout, Presence, Survey, look
from fedasync_iot.models import (
    Backoff,
    BrokerAddress,
    Connection,
    StateError,
    Topics,
    describe_error,
)

log = logging.getLogger("fedasync.coordinator")

KEEPALIVE_S = 30  # the broker publishes a crashed coordinator's last will after 1.5 x this


class FleetLease:
    """Whether this coordinator may serve its fleet: checked before every connection attempt
    (`gate`), and on every live coordinator status (`on_coordinator_status`). Once it may not
    (or its state is lost: `fail`), `failure` says why and the service stops merging."""

    def __init__(self, config: CoordinatorConfig, topics: Topics, identity: Identity, *,
                 version: Callable[[], int], publish: Callable[[str, bytes], object],
                 reset: bool) -> None:
        """`version`: the engine's; `publish(topic, payload)`: retained, QoS 1."""
        self.config = config
        self.topics = topics
        self.identity = identity
        self._version = version
        self._publish = publish
        # A state at version 0 (new, or its predecessor deleted) has merged nothing worth
        # keeping; started under a fleet the broker holds at version N > 0, it would publish
        # version 0 over the fleet's model and reject every agent's update (future_version).
        # The look before the first connection checks (gate); --reset skips it.
        self._check_version = version() == 0
        self._reset = reset
        if reset and not self._check_version:
            log.warning("--reset ignored: the state in %s is at version %d", config.state_dir,
                        version())
        self.failure: StateError | None = None
        self.ours = True  # False once another coordinator's status is the fleet's
        # Other fleets' coordinators whose status names our client id (the last look): their
        # updates may reach our broker session, and are theirs.
        self.sharing: tuple[Presence, ...] = ()
        self.standby = threading.Event()  # set while waiting for another coordinator to stop
        self.on_failure: Callable[[], None] | None = None
        self._link: Connection | None = None

    def attach(self, link: Connection) -> None:
        """The connection this lease gates (made after the lease: it calls `gate`)."""
        self._link = link

    def _connection(self) -> Connection:
        if self._link is None:
            raise RuntimeError("the lease has no connection")
        return self._link

    def presence(self, state: str) -> bytes:
        return self.identity.presence(state, version=self._version()).to_json()

    def gate(self) -> None:
        """Before every connection attempt (paho's thread): is the fleet ours to serve?

        Connecting with our client id while another coordinator holds it would take its broker
        session; it would take it back at its next reconnect, and so on. An OSError from here
        is a failed attempt (logged and retried by the connection)."""
        link = self._connection()
        first = not self.identity.has_served
        stopping = link.stopping
        # The URL this attempt goes to (with several, the connection's turn): a failure here is
        # that URL's, and is logged as such before the connection moves on.
        here = link.address
        try:
            survey = look(here, self.topics, stop=stopping)
        except LookTimeout as exc:
            if first and self._check_version and not self._reset:
                self.give_up(
                    f"the state in {self.config.state_dir} is at version 0, and the broker does "
                    f"not let this coordinator read which version it holds for fleet "
                    f"{self.config.fleet!r} ({exc}); not publishing version 0 blind over it: "
                    f"let the account read {self.topics.coordinator_status} and "
                    f"{self.topics.announce}, or start over with `run --reset`")
                raise ConnectionAbortedError("cannot check the fleet's version") from exc
            log.warning("could not check whether another coordinator serves fleet %r (%s: may "
                        "this broker account read and write %s?); connecting anyway",
                        self.config.fleet, exc, self.topics.coordinator_status)
            return
        if stopping.is_set():
            raise ConnectionAbortedError("stopping")
        rival = self.identity.rival(survey.status)
        if rival is not None:
            survey = self._wait_or_give_up(rival, first=first, here=here, stopping=stopping)
        self.sharing = self.identity.sharing(survey.others)
        clash = self.identity.clash(survey.others)
        if clash is not None:
            self.give_up(
                f"client id {self.config.mqtt_client_id!r} is in use by the coordinator of "
                f"fleet {clash.fleet!r} ({clash.describe()}) on this broker: two fleets with one "
                f"client id take one broker session from each other, and each receives the "
                f"other's updates. Give this coordinator a client_id of its own (or leave "
                f"client_id unset: it derives from the fleet)")
            raise ConnectionAbortedError("another fleet's coordinator uses this client id")
        if first:
            self._check_fleet_version(survey)

    def _wait_or_give_up(self, rival: Presence, *, first: bool, here: BrokerAddress,
                         stopping: threading.Event) -> Survey:
        """Another coordinator serves the fleet: wait for it to go offline (a standby's first
        connection; returns what the broker holds then), or give up."""
        if first and self.config.standby:
            self.standby.set()
            _log_standby(rival, self.config.fleet)
            try:
                survey = look(here, self.topics, stop=stopping,
                              until=lambda s: self.identity.rival(s) is None)
            except LookTimeout as exc:
                raise ConnectionError(str(exc)) from exc
            if stopping.is_set():
                raise ConnectionAbortedError("stopped while on standby")
            self.standby.clear()
            log.info("the other coordinator of fleet %r is offline: taking over",
                     self.config.fleet)
            return survey
        if first:
            self.give_up(
                f"another coordinator ({rival.describe()}) serves fleet {self.config.fleet!r} "
                f"on this broker; stop it first, or start this one with --standby (standby = "
                f"true) to take over when it stops. If it crashed, its last will marks it "
                f"offline within {1.5 * KEEPALIVE_S:g} s (1.5 x keepalive)")
        else:
            self.give_up(
                f"another coordinator ({rival.describe()}) took over fleet "
                f"{self.config.fleet!r} while this one was disconnected; this one stops rather "
                f"than take the broker session back and forth")
        raise ConnectionAbortedError("another coordinator serves this fleet")

    def _check_fleet_version(self, survey: Survey) -> None:
        """Refuse a state at version 0 under a fleet the broker holds at version N > 0."""
        held = survey.version
        if not self._check_version or not held:
            return
        if self._reset:
            # Said only when it overrides something: the simulator starts every run over.
            log.warning("--reset: fleet %r starts over at version 0 in %s; the broker held it at "
                        "version %d", self.config.fleet, self.config.state_dir, held)
            return
        self.give_up(
            f"the state in {self.config.state_dir} is at version 0 (new or lost), but the "
            f"broker holds fleet {self.config.fleet!r} at version {held}: restore the state "
            f"directory {self.config.state_dir} from a backup, or start the fleet over at "
            f"version 0 with `fedasync-coordinator run --reset`")
        raise ConnectionAbortedError("the fleet is further than this state")

    def on_coordinator_status(self, payload: bytes, retained: bool) -> None:
        """A coordinator status seen while connected. A retained one was judged before
        connecting; a live "online" of another instance means two coordinators merge the same
        updates (it uses another client id): the one serving since later gives up."""
        rival = None if retained else self.identity.rival(Presence.parse(payload))
        if rival is None:
            return
        if rival.since is not None and (rival.since, rival.instance or "") > (
                self.identity.since, self.identity.instance):
            log.warning("another coordinator (%s, client id other than %r) came online for "
                        "fleet %r; this one serves it since earlier and stays", rival.describe(),
                        self.config.mqtt_client_id, self.config.fleet)
            self._publish(self.topics.coordinator_status, self.presence("online"))
            return
        self.give_up(f"another coordinator ({rival.describe()}) serves fleet "
                     f"{self.config.fleet!r} on this broker under another client id; this one "
                     f"stops merging rather than merge the same updates twice")

    def give_up(self, message: str) -> None:
        """Stop merging at once, and let the process end (run_until raises StateError): the
        fleet (or our client id) is another coordinator's, so is its status."""
        if self.failure is not None:
            return
        self.ours = False
        self.fail(StateError(message))
        self._connection().stop()

    def fail(self, error: StateError) -> None:
        if self.failure is not None:
            return
        self.failure = error
        log.error("%s", error)
        if self.on_failure is not None:
            self.on_failure()


def _log_standby(rival: Presence, fleet: str) -> None:
    log.info("standby: another coordinator (%s) serves fleet %r on this broker; waiting for it "
             "to go offline (a clean stop says so at once, a crash after %g s, when its last "
             "will fires)", rival.describe(), fleet, 1.5 * KEEPALIVE_S)


def wait_as_standby(config: CoordinatorConfig, stop: threading.Event) -> bool:
    """`run --standby`: wait, before the state directory is even opened (a standby may share
    it), until no other live coordinator serves the fleet. True to go on, False if `stop` came
    first. An unreachable broker is retried with backoff, each failure logged with its reason;
    the service's own check before connecting follows (one coordinator may still beat us)."""
    address = BrokerAddress.parse(config.broker, ca_file=config.ca_file,
                                  cert_file=config.cert_file, key_file=config.key_file)
    topics = Topics(config.fleet, config.topic_root)
    identity = Identity(config.fleet)
    announced: list[Presence] = []

    def free(status: Presence | None) -> bool:
        rival = identity.rival(status)
        if rival is not None and not announced:
            announced.append(rival)
            _log_standby(rival, config.fleet)
        return rival is None

    candidates = address.candidates()  # with several URLs: each in turn, as the service does
    backoff, failures = Backoff(1.0, 30.0), 0
    while not stop.is_set():
        here = candidates[failures % len(candidates)]
        try:
            look(here, topics, stop=stop, until=free)
        except LookTimeout:
            return True  # the service's own check says why, and connects anyway
        except OSError as exc:
            delay = backoff.delay(failures)
            failures += 1
            log.warning("cannot connect to %s: %s; next attempt in %.1f s (%d failed so far)",
                        here.redacted(), describe_error(exc, here), delay, failures)
            stop.wait(delay)
            continue
        if announced and not stop.is_set():
            log.info("the other coordinator of fleet %r is offline: taking over", config.fleet)
        return not stop.is_set()
    return False
