"""
The backplane's two connections to Redis, kept up for as long as it runs.

The backplane needs a connection for commands (publishing, scripts, history)
and one subscribed to its channels, each re-established whenever it is lost.
It does not make them: it is given a :class:`Connections`, which it asks to
:meth:`~Connections.connect` when it starts and tells about everything that
happens to them through the :class:`Listener` interface, which the
backplane implements.  :class:`RedisConnections` is the real one, on
txredisapi's reconnecting factories; a test gives the backplane one of its
own and drives the listener, so that the backplane's bookkeeping is checked
through the same calls that Redis's comings and goings make.
"""

from __future__ import annotations

from typing import Any, List, Protocol

import txredisapi
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from broadcaster.redis.address import RedisAddress
from broadcaster.redis.commands import BackplaneConnection, CommandProtocol

#: Seconds a command may wait for Redis's answer before the connection is
#: given up as dead (and re-established).
REPLY_TIMEOUT = 5.0

#: Whether txredisapi parses replies with hiredis (a dependency).  Its
#: pure-Python parser, the fallback, handles one bulk string of a reply per
#: reactor turn (it pauses the connection and goes on with a ``callLater(0)``,
#: two epoll changes each time), so the events of one read reach the hub
#: turns apart, and each goes out on its own unless the hub waits for the
#: next.  With hiredis a read's events reach the hub in the turn that read
#: them, and go out together as a single node's do.
HIREDIS = txredisapi.hiredis is not None


class Commands(Protocol):
    """
    The command connection, as the backplane uses it
    (:class:`~broadcaster.redis.commands.CommandProtocol`).
    """

    def run(self, *args: Any) -> Deferred:
        """Send one command; fires with its reply."""

    def run_script(self, script: Any, keys: List[str], args: List[Any]) -> Deferred:
        """Run a :class:`~broadcaster.redis.commands.Script`; fires with its reply."""


class Subscription(Protocol):
    """
    The subscribing connection, as the backplane uses it.
    """

    connected: Any

    def subscribe(self, channels: List[str]) -> Deferred:
        """Subscribe to ``channels``; fires once Redis confirmed."""

    def ssubscribe(self, channel: str) -> Deferred:
        """Subscribe to the sharded channel ``channel`` (Redis 7); fires once confirmed."""

    def sunsubscribe(self, channel: str) -> Deferred:
        """Stop receiving the sharded channel ``channel``; fires once confirmed."""


class Listener(Protocol):
    """
    What the connections tell the backplane.  Each ``*_ready`` is followed,
    sooner or later, by the matching ``*_lost`` for the same connection.
    """

    def commands_ready(self, commands: Commands) -> None:
        """A command connection is up and authenticated."""

    def commands_lost(self, commands: Commands) -> None:
        """That command connection is gone (a new one is on its way)."""

    def subscription_ready(self, subscription: Subscription) -> None:
        """A connection for subscribing is up and authenticated."""

    def subscription_lost(self, subscription: Subscription) -> None:
        """That connection is gone (a new one is on its way)."""

    def message_received(self, channel: bytes, message: bytes) -> None:
        """A message arrived on a subscribed channel."""

    def connect_failed(self, failure: Failure) -> None:
        """An attempt to connect failed (another follows)."""

    def gave_up(self, failure: Failure) -> None:
        """Redis refused this client (a wrong password, a missing database):
        no more attempts will be made."""


class Connections(Protocol):
    """
    Keeps a command connection and a subscribing connection up.
    """

    def connect(self, listener: Listener) -> None:
        """Start connecting, and reconnecting after every loss."""

    def disconnect(self) -> Deferred:
        """Stop reconnecting and close both; fires once closed."""


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """
    Tells the listener about each failed connection attempt (txredisapi
    retries them quietly).
    """

    def __init__(self, endpoint: IStreamClientEndpoint, failed, url: str) -> None:
        self._endpoint = endpoint
        self._failed = failed
        self._url = url

    def __repr__(self) -> str:
        # Twisted logs it with every reconnection attempt.
        return "Redis at {}".format(self._url)

    def connect(self, factory) -> Deferred:
        def failed(failure):
            self._failed(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)


class SubscriberProtocol(BackplaneConnection, txredisapi.SubscriberProtocol):
    """
    txredisapi's subscriber, handing each message to the listener, and
    knowing sharded pub/sub (Redis 7: ``SSUBSCRIBE``, ``smessage``), which
    the backplane uses for rooms: the same commands work on one server and
    on a cluster, where a sharded channel lives on its slot's shard only.
    """

    _sub_unsub_reponses = txredisapi.SubscriberProtocol._sub_unsub_reponses | {
        "ssubscribe", "sunsubscribe", b"ssubscribe", b"sunsubscribe",
    }

    def replyReceived(self, reply) -> None:
        if isinstance(reply, list) and len(reply) == 3 and reply[0] in (b"smessage", "smessage"):
            self.messageReceived(None, reply[1], reply[2])
            return
        super().replyReceived(reply)

    def messageReceived(self, pattern, channel, message) -> None:
        self.factory.listener.message_received(channel, message)

    def ssubscribe(self, channel: str) -> Deferred:
        # One channel per command: txredisapi hands a waiting caller the
        # first confirmation only.
        return self.execute_command("SSUBSCRIBE", channel, apply_timeout=False)

    def sunsubscribe(self, channel: str) -> Deferred:
        return self.execute_command("SUNSUBSCRIBE", channel)


class ReconnectingFactory(txredisapi.RedisFactory):
    """
    One reconnecting connection that tells the listener when it is ready
    and when it is lost.  Replies stay bytes: numbers and text are decoded
    by the backplane, where their meaning is known.

    :param subscriber: whether this is the subscribing connection (no
        database, no reply timeout: a subscription waits for messages).
    """

    initialDelay = 0.5
    maxDelay = 10

    def __init__(
        self, address: RedisAddress, listener: Listener, clock: IReactorTime, subscriber: bool
    ) -> None:
        super().__init__(
            address.redacted(),
            None if subscriber else address.db,
            1,
            isLazy=True,
            charset=None,
            password=address.password,
            replyTimeout=None if subscriber else REPLY_TIMEOUT,
            convertNumbers=False,
            username=address.username,
        )
        self.protocol = SubscriberProtocol if subscriber else CommandProtocol
        self.clock = clock
        self.listener = listener
        self._subscriber = subscriber
        # Fires once the first connection is ready, fails only if txredisapi
        # gives up (e.g. a wrong password).
        self.deferred.addErrback(listener.gave_up)

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        listener = self.listener
        ready, lost = (
            (listener.subscription_ready, listener.subscription_lost)
            if self._subscriber
            else (listener.commands_ready, listener.commands_lost)
        )
        protocol.whenConnected().addCallback(ready)
        protocol.whenDisconnected().addCallback(lost)
        return protocol


class RedisConnections:
    """
    The real :class:`Connections`: txredisapi's reconnecting factories,
    connecting to ``address`` with ``reactor`` (backing off from 0.5 s to
    10 s between attempts).
    """

    _log = Logger()

    def __init__(self, address: RedisAddress, reactor: Any) -> None:
        self.address = address
        self._reactor = reactor
        self.factories: List[ReconnectingFactory] = []

    def connect(self, listener: Listener) -> None:
        endpoint = _WatchedEndpoint(
            self.address.endpoint(self._reactor), listener.connect_failed, self.address.redacted()
        )
        self.factories = [
            ReconnectingFactory(self.address, listener, self._reactor, subscriber=False),
            ReconnectingFactory(self.address, listener, self._reactor, subscriber=True),
        ]
        for factory in self.factories:
            factory.startConnecting(endpoint)
        if not HIREDIS:
            self._log.warn(
                "hiredis is not installed: Redis replies are parsed in Python, one"
                " at a time (pip install hiredis for the cross-node throughput)"
            )

    def disconnect(self) -> Deferred:
        return gatherResults(
            [factory.disconnect() for factory in self.factories], consumeErrors=True
        ).addErrback(lambda failure: None)
