"""Models on demand (docs/architecture.md): the agent's model fetcher.

With a link that can subscribe (`Subscribes`), the agent does not receive every snapshot the
coordinator publishes. It listens to the small retained announcement (version, sha256, size,
cohort) while it wants a model: eligible and due to train, or its model last checked
`model_refresh_s` ago (or none yet). When the announcement names something newer that it would
use, it fetches the snapshot (subscribes to the model topic, takes the retained message,
unsubscribes), verifies it as always, and trains. When the announcement names a compact snapshot
(a newer coordinator), it fetches that instead, from the weights topic, and the model's template
(the ONNX graph without weights) from the template topic only when it is not cached in
``state_dir/templates``: it trains from the weights (float32) and `agent.Predictor` builds the
ONNX model from template + weights. Both subscriptions are QoS 0, so a persistent session never
queues snapshots or announcements while the device is offline; a subscription made again after
a reconnect brings the retained message. On a metered network (the policy's network check fails)
it fetches nothing unless ``fetch_on_metered``. ``model_refresh_s = 0`` follows every version
instead (subscribed to the model topic whenever the network allows).

What the fetcher does is one `FetchState`; how models reach it at all is its `Mode`. What
arrives (announcements, snapshots, templates) is received and verified by `agent._intake`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from enum import Enum

from fedasync_iot.agent._link import Subscribes
from fedasync_iot.agent._model_cache import ModelCache
from fedasync_iot.agent._shared import Shared
from fedasync_iot.agent._watch import CoordinatorWatch
from fedasync_iot.models import Announcement

log = logging.getLogger("fedasync.agent")

# A fetch whose retained snapshot has not arrived by then is given up (and retried at a later
# check): the broker may have lost it, or an ACL may hide it.
FETCH_TIMEOUT_S = 120.0
# Listening this long without hearing the retained announcement means the coordinator does not
# announce (it predates models on demand, or the broker's ACL hides the topic): follow every
# snapshot instead, so an agent upgraded before its coordinator keeps training.
ANNOUNCE_WAIT_S = 30.0
# An announcement subscription unheard this long is made again. A clustered broker can miss the
# retained announcement on a new subscription: on NATS, a node's copy of the retained messages
# lags those published on another node, and a publication made before interest in the new
# subscription reached the publisher's node is not routed to it. A new SUBSCRIBE makes the
# broker send what it holds again (MQTT 3.1.1, 3.8.4); on one Mosquitto it never comes to this.
RELISTEN_S = 5.0
# A compact snapshot (or its template) that does not arrive in FETCH_TIMEOUT_S (a broker whose
# ACL predates them hides both topics) makes the agent fetch full snapshots for this long.
COMPACT_RETRY_S = 3600.0


class Mode(Enum):
    """How models reach the agent (the status's ``models``)."""

    LINK = "link"  # a link that cannot subscribe delivers what it subscribed to itself
    FOLLOW = "follow"  # model_refresh_s = 0: subscribed to the model topic
    ON_DEMAND = "on demand"
    # No announcement heard in ANNOUNCE_WAIT_S: following snapshots, listening for one.
    UNANNOUNCED = "follow (the coordinator does not announce)"


class FetchState(Enum):
    """What the fetcher does now (the status's ``model_fetch``)."""

    IDLE = "idle"  # no model wanted: nothing subscribed
    LISTENING = "listening"  # subscribed to the announcements: is there a newer model?
    FETCHING = "fetching"  # subscribed to a snapshot's topics, its retained message awaited
    VERIFYING = "verifying"  # a snapshot arrived: signature, sha256, spec
    FOLLOWING = "following"  # subscribed to every snapshot (Mode.FOLLOW, Mode.UNANNOUNCED)


class Subscriptions:
    """The fetcher's subscriptions, QoS 0 (module docstring): nothing queues in the session
    while offline. `heard`: an announcement arrived since the announcement topic was last
    subscribed to (the retained one arrives as it is)."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.subscribed: set[str] = set()
        self.heard = False
        self.listening_since: float | None = None  # net_clock: announcements subscribed to
        self._relistened_at = -float("inf")  # net_clock: last subscription made again

    @property
    def listening(self) -> bool:
        return self.shared.topics.announce in self.subscribed

    def want(self, topic: str, wanted: bool) -> None:
        link = self.shared.link
        if not isinstance(link, Subscribes) or wanted == (topic in self.subscribed):
            return
        announce = topic == self.shared.topics.announce
        if wanted:
            self.subscribed.add(topic)
            if announce:
                self.heard = False  # until the retained announcement arrives
                self.listening_since = self.shared.net_clock()
            link.subscribe(topic, 0)
        else:
            self.subscribed.discard(topic)
            if announce:
                self.heard = False  # announcements are no longer heard
                self.listening_since = None
            link.unsubscribe(topic)

    def reset(self, link: Subscribes) -> None:
        """Unsubscribe from every topic the fetcher uses, held here or not, where the broker
        kept a session; a sessionless device's connection starts with none (and on NATS each
        UNSUBSCRIBE would cost a JetStream write)."""
        if self.shared.config.session == "persistent":
            t = self.shared.topics
            for topic in (t.announce, t.model, t.template, t.weights):
                link.unsubscribe(topic)
        self.subscribed.clear()
        self.heard = False
        self.listening_since = None

    def relisten(self) -> None:
        """Subscribe again to the announcements if unheard for RELISTEN_S (see there)."""
        since = self.listening_since
        if since is None or self.heard or not isinstance(self.shared.link, Subscribes):
            return
        now = self.shared.net_clock()
        if now - max(since, self._relistened_at) < RELISTEN_S:
            return
        self._relistened_at = now
        log.debug("no announcement on %s for %.0f s: subscribing again",
                  self.shared.topics.announce, now - since)
        self.shared.link.subscribe(self.shared.topics.announce, 0)


class ModelFetcher:
    """Which model topics to subscribe to, when to fetch and when a fetch failed, in one
    `FetchState`, and a poll's wait for the model; what arrives is agent._intake's. All of it
    under the shared lock: arrivals come on the network thread, checks and polls on the
    agent's own.

    `network_allows` says whether the network lets it fetch now; `wants_to_train` whether the
    agent would train on a newer model now (eligible, due, not training already)."""

    def __init__(self, shared: Shared, cache: ModelCache, watch: CoordinatorWatch, *,
                 network_allows: Callable[[], bool], wants_to_train: Callable[[], bool]) -> None:
        self.shared = shared
        self.cache = cache
        self.watch = watch
        self._network_allows = network_allows
        self._wants_to_train = wants_to_train
        self.mode = (Mode.LINK if not isinstance(shared.link, Subscribes)
                     else Mode.FOLLOW if shared.config.model_refresh_s == 0 else Mode.ON_DEMAND)
        self._state = FetchState.IDLE
        self.subscriptions = Subscriptions(shared)
        self._at_rest()
        self.announcement: Announcement | None = None
        self._fetch_since = 0.0  # net_clock: when the fetch under way (FETCHING) started
        self._refused_sha: str | None = None  # a snapshot refused: not fetched again
        self._compact_off_until = -float("inf")  # net_clock: full snapshots only until then
        self._checked_at = -float("inf")  # monotonic: when the model was last known newest
        self._news = threading.Event()  # set when an announcement or a snapshot arrives
        self._interrupted = False  # set by interrupt(): a poll's wait for the model ends

    @property
    def state(self) -> FetchState:
        return self._state

    @property
    def subscribed(self) -> set[str]:
        return self.subscriptions.subscribed

    def _at_rest(self) -> None:
        """No fetch nor verification under way: the state says what is subscribed to."""
        self._state = (FetchState.FOLLOWING if self.mode in (Mode.FOLLOW, Mode.UNANNOUNCED)
                       else FetchState.LISTENING if self.subscriptions.listening
                       else FetchState.IDLE)

    def _want(self, topic: str, wanted: bool) -> None:
        self.subscriptions.want(topic, wanted)
        if self._state not in (FetchState.FETCHING, FetchState.VERIFYING):
            self._at_rest()

    def _start_fetch(self, topic: str) -> None:
        self._state = FetchState.FETCHING
        self._fetch_since = self.shared.net_clock()
        self._want(topic, True)

    def _end_fetch(self) -> None:
        t = self.shared.topics
        for topic in (t.model, t.template, t.weights):
            self.subscriptions.want(topic, False)
        self._at_rest()

    def reconnected(self) -> bool:
        """A clean slate, when the fetcher subscribes at all (then True): what the broker
        session kept (an older agent's QoS 1 model subscription, a fetch cut short by the
        disconnect) goes; the wanted subscriptions are made again by the next `sync`, which
        brings their retained messages."""
        link = self.shared.link
        if self.mode is Mode.LINK or not isinstance(link, Subscribes):
            return False
        with self.shared.lock:
            self.subscriptions.reset(link)
            if self._state is not FetchState.VERIFYING:
                self._at_rest()
        return True

    # -- what arrives (agent._intake, under the lock) ---------------------------------------
    def heard(self, announcement: Announcement) -> bool:
        """The coordinator's announcement of the snapshot the broker holds: fetched if this
        agent would use it now. True when heard with no fetch under way: what it names is held
        (or refused)."""
        self.announcement = announcement
        if self.subscriptions.listening:
            self.subscriptions.heard = True
        if self.mode is Mode.UNANNOUNCED:
            log.info("the coordinator announces models now: fetching on demand again")
            self.mode = Mode.ON_DEMAND
            self._want(self.shared.topics.model, False)
        self.sync()
        return self.subscriptions.heard and self._state is not FetchState.FETCHING

    def start_verifying(self) -> bool:
        """A snapshot arrived; True when fetched (a fetch takes one snapshot: the retained
        one)."""
        fetched = self._state is FetchState.FETCHING
        if fetched:
            self._end_fetch()
        self._state = FetchState.VERIFYING
        return fetched

    def stop_verifying(self, *, current: bool = False) -> None:
        """Verified, or not; `current`: it is the broker's newest, as of now."""
        if self._state is FetchState.VERIFYING:
            self._at_rest()
        if current:
            self._checked_at = self.shared.monotonic()

    def refused(self, sha256: str | None) -> None:
        """What arrived was refused: a fetch under way ends, and the bytes `sha256` names are
        not fetched again (the same bytes would be refused again; a newer announcement, naming
        other bytes, is fetched as usual)."""
        if self._state is FetchState.FETCHING:
            self._end_fetch()
        self._refused_sha = sha256

    def template_cached(self) -> None:
        """The template a compact fetch waited for is cached: on to its weights."""
        topics = self.shared.topics
        if topics.template in self.subscribed and self._state is FetchState.FETCHING:
            self._want(topics.template, False)
            self._start_fetch(topics.weights)

    def notify(self) -> None:
        """Something arrived: a poll waiting for the model looks again."""
        self._news.set()

    # -- what the agent wants (under the lock) -----------------------------------------------
    def model_is_newest(self) -> bool:
        """Whether the held model is the newest this agent would train on. Fetching on demand
        and connected, it must have heard the announcement since it last subscribed, and that
        must name nothing newer (nor a fetch be under way): an agent back from idle must not
        train on a model it fetched hours ago. Offline it trains on what it has, as always."""
        with self.shared.lock:
            if self.mode is not Mode.ON_DEMAND or not self.shared.link.connected:
                return True
            a = self.announcement
            return (self.subscriptions.heard and self._state is not FetchState.FETCHING
                    and a is not None and (not self._newer(a) or self._is_refused(a)))

    def follow_again(self) -> None:
        """Following snapshots, subscribe to the model topic again (at the next `sync`): its
        retained snapshot comes again (a coordinator went back to it)."""
        if self.mode in (Mode.FOLLOW, Mode.UNANNOUNCED):
            self._want(self.shared.topics.model, False)

    def _refresh_due(self) -> bool:
        return (self.cache.snapshot is None or self.shared.monotonic() - self._checked_at
                >= self.shared.config.model_refresh_s)

    def _newer(self, a: Announcement) -> bool:
        """Whether `a` names a model this agent does not hold: a later version, or the same
        version with a round's cohort widened to invite this device."""
        s = self.cache.snapshot
        if s is None or a.version != s.version:
            return s is None or a.version > s.version or self.watch.went_back_to(a.version)
        me = self.shared.config.device_id
        return (a.cohort is not None and me in a.cohort
                and s.cohort is not None and me not in s.cohort)

    def _is_refused(self, a: Announcement) -> bool:
        """Whether what `a` names was refused already (the same bytes would be again)."""
        return self._refused_sha is not None and self._refused_sha in (a.sha256,
                                                                       a.weights_sha256)

    def _unheard_too_long(self) -> bool:
        since = self.subscriptions.listening_since
        return (since is not None and self.announcement is None
                and self.shared.net_clock() - since >= ANNOUNCE_WAIT_S)

    def sync(self) -> None:
        """Subscribe to what the agent wants now, unsubscribe from the rest, start or end a
        fetch. Cheap when nothing changes; called on every check and every arrival."""
        if self.mode is Mode.LINK or not self.shared.link.connected:
            return
        topics = self.shared.topics
        allowed = self._network_allows()
        if self.mode is Mode.ON_DEMAND and self._unheard_too_long():
            log.warning("no model announcement on %s in %.0f s: the coordinator does not "
                        "announce (older than this agent, or the broker's ACL hides the topic); "
                        "following every snapshot on %s instead", topics.announce,
                        ANNOUNCE_WAIT_S, topics.model)
            self.mode = Mode.UNANNOUNCED
            if self._state is not FetchState.VERIFYING:
                self._at_rest()
        if self.mode is Mode.FOLLOW:
            self._want(topics.model, allowed)
            return
        if self.mode is Mode.UNANNOUNCED:  # still listening, in case the coordinator announces
            self._want(topics.announce, True)
            self._want(topics.model, allowed)
            return
        self._sync_on_demand(allowed)

    def _sync_on_demand(self, allowed: bool) -> None:
        topics = self.shared.topics
        subs = self.subscriptions
        a = self.announcement
        if (subs.heard and a is not None and self._state is not FetchState.FETCHING
                and (not self._newer(a) or self._is_refused(a))):
            self._checked_at = self.shared.monotonic()  # heard the newest: the model is current
        train = allowed and self._wants_to_train()
        refresh = allowed and self._refresh_due()
        # Not while training (`wants_to_train`): the announcements heard then would all be
        # stale by its end, and were most of an always-eligible device's downlink. Subscribing
        # again afterwards brings the retained (newest) one at once.
        self._want(topics.announce, train or refresh)
        subs.relisten()
        if self._state is FetchState.VERIFYING:
            return  # what arrives may be what would be fetched: decided once it is verified
        if self._state is FetchState.FETCHING:
            if not allowed:
                log.info("model fetch cancelled: the network is metered now")
                self._end_fetch()
                return
            if self.shared.net_clock() - self._fetch_since <= FETCH_TIMEOUT_S:
                return
            waited = self.subscribed - {topics.announce}
            log.warning("no model snapshot arrived in %.0f s after subscribing to %s; "
                        "trying again later", FETCH_TIMEOUT_S, ", ".join(sorted(waited)))
            self._end_fetch()
            if not waited & {topics.template, topics.weights}:
                return
            # Compact: the broker may hide its topics (an ACL that predates them). On to the
            # full snapshot at once, and for a while.
            log.warning("fetching full snapshots for %.0f s instead of compact ones (does the "
                        "broker's ACL let devices read %s and %s?)", COMPACT_RETRY_S,
                        topics.template, topics.weights)
            self._compact_off_until = self.shared.net_clock() + COMPACT_RETRY_S
        if not (subs.heard and a is not None and self._newer(a) and not self._is_refused(a)):
            return
        me = self.shared.config.device_id
        for_training = train and (a.cohort is None or me in a.cohort)
        if refresh or for_training:
            self._fetch(a, "training" if for_training else "inference (refresh)")

    def _fetch(self, a: Announcement, why: str) -> None:
        if why == "training":
            self.shared.counters.fetched_for_training += 1
        else:
            self.shared.counters.fetched_for_refresh += 1
        topics = self.shared.topics
        if (a.template is None or a.weights_size is None  # an older coordinator
                or self.shared.net_clock() < self._compact_off_until):
            log.info("fetching model version %d (%d bytes) for %s", a.version, a.size, why)
            self._start_fetch(topics.model)
        elif self.cache.template(a.template) is None:
            log.info("fetching model template %s, then version %d (%d bytes) for %s",
                     a.template[:12], a.version, a.weights_size, why)
            self._start_fetch(topics.template)
        else:
            log.info("fetching model version %d (%d bytes, compact) for %s", a.version,
                     a.weights_size, why)
            self._start_fetch(topics.weights)

    # -- a poll's wait for the model (the agent's thread) ------------------------------------
    def await_model(self, wait_s: float) -> None:
        """Wait (at most `wait_s`, on the network clock) while an announcement or a fetch the
        agent wants is on its way; returns at once when there is none.

        No announcement is awaited from a coordinator that does not announce: following its
        snapshots (Mode.UNANNOUNCED), the announcement subscription only listens for a change
        of coordinator, and waiting for it held every poll `wait_s`. Nor past ANNOUNCE_WAIT_S
        of silence: the wait ends there, and the agent starts following snapshots at once
        rather than at its next check."""
        clock = self.shared.net_clock
        deadline = clock() + wait_s
        while True:
            self._news.clear()
            with self.shared.lock:
                if self._announce_wait_left() == 0.0:
                    self.sync()  # gives up on announcements: follows snapshots from now on
                subs = self.subscriptions
                listening = (subs.listening and not subs.heard
                             and self.mode is not Mode.UNANNOUNCED)
                connected = self.shared.link.connected
                if listening and connected:
                    subs.relisten()
                pending = connected and (self._state is FetchState.FETCHING or listening)
                give_up = self._announce_wait_left() if listening else None
            left = deadline - clock()
            if not pending or left <= 0 or self._interrupted:
                return
            if listening:  # woken to subscribe again, if it comes to that
                left = min(left, RELISTEN_S)
            self._news.wait(left if give_up is None else min(left, max(give_up, 0.01)))

    def interrupt(self) -> None:
        """End a poll's wait for the model at once, and every later one (the owner stops)."""
        self._interrupted = True
        self._news.set()

    def _announce_wait_left(self) -> float | None:
        """Seconds (net_clock) until an unheard announcement subscription means the coordinator
        does not announce, 0.0 once it does; None when no such wait is under way."""
        since = self.subscriptions.listening_since
        if since is None or self.announcement is not None or self.mode is Mode.UNANNOUNCED:
            return None
        return max(0.0, since + ANNOUNCE_WAIT_S - self.shared.net_clock())

