"""
The command connection to Redis: txredisapi's protocol, with a lean way
to send the commands the backplane sends for every message.

txredisapi encodes a command argument by argument in Python, hashes a
script's source on every ``eval``, wraps each call in four Deferreds, and
arms and cancels a timeout ``DelayedCall`` for every command: measured
with cProfile on the publishing node of the cross-node benchmark, that was
more than a quarter of its CPU per message.  :class:`CommandProtocol`
encodes a command in one pass, sends a script by the SHA1 computed once
(:class:`Script`), and watches every reply it waits for with one timer per
connection.  Commands are written through the transport, which sends all
of a reactor turn's commands in one system call: Redis then runs them, and
publishes their messages, in one go, which is what lets the other nodes
fan several messages out per round.  (Sending each at once, as
the WebSocket fan-out does for clients, measured slower on
every node.)  Replies still come through
txredisapi's parser (hiredis) and its reply queue, so its own commands and
these stay in one order.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class Script:
    """
    A Lua script, with the SHA1 Redis knows it by.
    """

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest().encode("ascii")

    def __repr__(self) -> str:
        return "<Script {}>".format(self.sha[:8].decode("ascii"))


def _bulk(arg: Any) -> bytes:
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, (bytes, bytearray)):
        return bytes(arg)
    if isinstance(arg, float):
        return format(arg, "f").encode("ascii")
    return str(arg).encode("utf-8")


def encode_command(args: Sequence[Any]) -> bytes:
    """
    ``args`` as one RESP command: an array of bulk strings.

    Text is sent as UTF-8 and numbers in decimal, as txredisapi does.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        # The common cases first: the hot path sends bytes, text and ints.
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode("utf-8")
        elif kind is int:
            data = b"%d" % arg
        else:
            data = _bulk(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class BackplaneConnection:
    """
    What both of the backplane's connections to Redis (commands and
    subscription) change in txredisapi's protocols.
    """

    def connectionMade(self) -> None:
        # txredisapi leaves Nagle's algorithm on: a small command written
        # while another is unacknowledged waits for the ACK.
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # Unix sockets have no Nagle to turn off
            pass
        super().connectionMade()

    def tryConvertData(self, data: Any) -> Any:
        """
        Replies as the parser made them: these connections are made with no
        charset and no number conversion, and txredisapi's own version
        would copy every array and test every element only to change
        nothing.
        """
        return data


class CommandProtocol(BackplaneConnection, txredisapi.RedisProtocol):
    """
    txredisapi's protocol with :meth:`run` and :meth:`run_script`.

    A script is sent with ``EVAL`` the first time on a connection (Redis
    runs a connection's commands in order, so every later ``EVALSHA`` finds
    it) and with ``EVALSHA`` after.  Should Redis forget it meanwhile
    (``SCRIPT FLUSH``), the connection is dropped: retrying with ``EVAL``
    could run a later command before an earlier one, and the backplane
    already knows how to recover from a lost connection without losing or
    reordering anything.

    Its ``replyTimeout`` is how long Redis may send no reply at all while
    replies are awaited before the connection is given up as hung.
    """

    _log = Logger()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting = 0
        self._progress = 0.0
        self._watch = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # The factory's clock (the backplane's), else the reactor's.
        clock = getattr(self.factory, "clock", None)
        if clock is None:
            from twisted.internet import reactor as clock
        self._seconds = clock.seconds
        if self.replyTimeout:
            self._watch = LoopingCall(self._check_progress)
            self._watch.clock = clock
            self._watch.start(max(self.replyTimeout / 5, 0.05), now=False)

    def connectionLost(self, reason) -> None:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        super().connectionLost(reason)

    def run(self, *args: Any) -> Deferred:
        """
        Send one command.

        :return: a Deferred firing with the reply, or failing with
            txredisapi's ``ResponseError`` for an error reply.
        :raise txredisapi.ConnectionError: if the connection is gone.
        """
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        self.transport.write(encode_command(args))
        return self._reply()

    def run_script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Deferred:
        """
        Run ``script`` with ``keys`` and ``args``.
        """
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        if script.sha in self.script_hashes:
            command = encode_command((b"EVALSHA", script.sha, len(keys), *keys, *args))
        else:
            command = encode_command((b"EVAL", script.source, len(keys), *keys, *args))
            self.script_hashes.add(script.sha)
        self.transport.write(command)
        return self._reply()

    def _reply(self) -> Deferred:
        if not self._awaiting:
            self._progress = self._seconds()
        self._awaiting += 1
        return self.replyQueue.get().addCallback(self._answered)

    def _answered(self, reply: Any) -> Any:
        self._awaiting -= 1
        if self._awaiting:
            self._progress = self._seconds()
        if isinstance(reply, Exception):
            if (
                isinstance(reply, txredisapi.ResponseError)
                and str(reply).startswith("NOSCRIPT")
                and self.transport is not None
                and not self.transport.disconnecting
            ):
                # Once, however many commands in flight get the same answer.
                self._log.error(
                    "Redis forgot this connection's scripts (SCRIPT FLUSH?): reconnecting"
                )
                self.script_hashes.clear()
                self.transport.loseConnection()
            raise reply
        return reply

    def _check_progress(self) -> None:
        if self._awaiting and self._seconds() - self._progress > self.replyTimeout:
            error = txredisapi.TimeoutError(
                "Not received Redis response in {0} seconds".format(self.replyTimeout)
            )
            self._log.error(
                "Redis sent no reply in {timeout} seconds to {count} commands: reconnecting",
                timeout=self.replyTimeout,
                count=self._awaiting,
            )
            while self.replyQueue.waiting:
                self.replyQueue.put(error)
            self.transport.abortConnection()
