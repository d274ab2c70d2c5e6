"""
The line bridge (``--line-port``, default ``tcp:9997``): chat with ``nc``.

Wire format: UTF-8 text, one message per line, lines end with LF or CRLF.

Client to server
    Each non-empty line is broadcast as a text message from this client, to
    every client of every kind (this one included, as in plain WebSocket
    mode).  A line longer than ``--max-line-length`` bytes or not valid
    UTF-8 is answered with ``ERROR <reason>`` and not broadcast; the
    connection stays up.  If ``--max-line-length`` bytes arrive without any
    line end, the client gets ``ERROR ...`` and is disconnected (there is no
    telling where its next line would start).  A client over
    ``--max-connections`` (see :mod:`broadcaster.protocols.admission`), or silent for
    ``--raw-idle-timeout``, gets one ``ERROR ...`` line and is disconnected.
    So is a client whose first line is an HTTP request line (``POST /
    HTTP/1.1``): a browser made to post a form here by some web page,
    whose headers would otherwise become chat messages.

    With sign-in configured (``--auth-url``, ``--jwt-*``) and the port open
    (``--anonymous-raw-ports``), a first line ``AUTH <credential>`` (a
    signed token, or whatever ``--auth-url`` takes as a bearer credential)
    signs the client in, checked exactly as a WebSocket handshake's
    ``Authorization: Bearer``: it is answered ``OK signed in as <user>``
    and has the rights its sign-in gives, or ``ERROR authentication
    failed; closing`` and is disconnected.  Without ``AUTH`` a client has
    the rights of ``--anonymous-rooms``.

Server to client
    Every text message broadcast in the lobby, one per line, as ``<sender
    id>: <text>``; line breaks inside a message are replaced by spaces so
    that one message stays one line, and other control characters (ESC,
    backspace, ...; not tab) are written as escapes such as ``\x1b`` (see
    :mod:`broadcaster.core.text`): another user's message cannot send
    escape sequences to an ``nc`` user's terminal.  Arrivals and departures as ``<id>
    connected`` / ``<id> disconnected``.  ``ERROR <reason>`` answers bad
    input (no message can look like one: messages start with an id and a
    colon).  Binary messages and images are not sent to line clients.

Lines are split by hand rather than by Twisted's
:class:`~twisted.protocols.basic.LineReceiver`: its ``MAX_LENGTH`` counts
the CR of a CRLF split across reads, so the limit above could only be kept
to within a byte, or by reading its private buffer (the fuzz test's model of
this wire format caught the difference).
"""

from __future__ import annotations

import re
from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from broadcaster.protocols.admission import Admission
from broadcaster.core.flow import Limits
from broadcaster.core.events import encoded, Event, Joined, Left, TextMessage
from broadcaster.core.hub import Hub, NotInRoom
from broadcaster.core.identity import SignIn
from broadcaster.core.permissions import EVERYTHING, Forbidden, Grants
from broadcaster.core.text import escape_controls
from broadcaster.protocols.connection import RawMemberFactory, RawMemberProtocol

# An HTTP/1.x request line, as a browser sends one.
_HTTP_REQUEST_LINE = re.compile(rb"[A-Z]{3,10} \S+ HTTP/1\.[01]\Z")

# Everything a terminal, or Python's str.splitlines(), treats as a line break.
_LINE_BREAKS = re.compile("\r\n|[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def _error_line(reason: str) -> bytes:
    return "ERROR {}\n".format(reason).encode("utf-8")


def as_line(event: Event) -> Optional[bytes]:
    """
    The line a line-bridge client receives for ``event``, or ``None``.

    Messages start with their sender's id and a colon, so that no message
    can pass for an announcement or for the server's ``ERROR`` lines.
    """
    if isinstance(event, TextMessage):
        # One message, one line; and nothing in it a terminal would obey.
        text = "{}: {}".format(event.sender, escape_controls(_LINE_BREAKS.sub(" ", event.text)))
    elif isinstance(event, Joined):
        text = "{} connected".format(event.member)
    elif isinstance(event, Left):
        text = "{} disconnected".format(event.member)
    else:
        return None
    return text.encode("utf-8") + b"\n"


class LineBridgeProtocol(RawMemberProtocol):
    """
    One line-bridge client.
    """

    _log = Logger()
    kind = "line"
    error = staticmethod(_error_line)

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._first_line = True

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.touched()
        limit = self.factory.max_line_length
        self._buffer += data
        start = 0
        while not self.signing_in:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = self._buffer[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            start = end + 1
            self._line_received(bytes(line), limit)
        del self._buffer[:start]
        # A trailing \r may be the first half of a CRLF split across reads.
        if len(self._buffer) - self._buffer.endswith(b"\r") > limit:
            reason = "no line end within {} bytes; closing".format(limit)
            self._log.warn(
                "[BAD INPUT] {client} ({peer}): {reason}",
                client=self.id,
                peer=self.peer,
                reason=reason,
            )
            self._buffer = bytearray()
            self.close_with(_error_line(reason))

    def _line_received(self, line: bytes, limit: int) -> None:
        if self._first_line:
            self._first_line = False
            if _HTTP_REQUEST_LINE.match(line):
                self._speaks_http()
                return
            if self.signs_in(line):
                return
        if self.closing:
            return
        if len(line) > limit:
            self._refuse("line of {} bytes is longer than the limit of {}".format(len(line), limit))
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            self._refuse("line is not valid UTF-8 (byte {} at {})".format(
                hex(line[e.start]), e.start))
            return
        self.factory.hub.stats.received(self.kind, len(line))
        if text.strip() and self.within_rate(_error_line):
            try:
                self.factory.hub.publish_text(self.id, text)
            except (Forbidden, NotInRoom) as e:
                self._refuse(str(e))

    def signed_in(self) -> bytes:
        return "OK signed in as {}\n".format(escape_controls(self.user or "-")).encode("utf-8")

    def resume_input(self) -> None:
        # Lines that came with the AUTH line, or while it was checked.
        self.dataReceived(b"")

    def _speaks_http(self) -> None:
        """
        The client's first line is an HTTP request line: a web page that
        a browser was made to send here (a form posted to
        ``http://localhost:9997/``), whose headers and body would otherwise
        be posted line by line as chat messages.  Nobody typing into ``nc``
        starts with one.
        """
        reason = "this is the line bridge, not an HTTP server; closing"
        self.factory.hub.stats.bad_input[self.kind] += 1
        self._log.warn(
            "[BAD INPUT] {client} ({peer}): an HTTP request; closing",
            client=self.id,
            peer=self.peer,
        )
        self._buffer = bytearray()
        self.close_with(_error_line(reason))

    def _refuse(self, reason: str) -> None:
        self.factory.hub.stats.bad_input[self.kind] += 1
        self._log.warn(
            "[BAD INPUT] {client} ({peer}): {reason}", client=self.id, peer=self.peer, reason=reason
        )
        self.send(_error_line(reason))

    def deliver(self, event: Event) -> None:
        if self.closing:
            return
        line = encoded(event, LineBridgeProtocol, as_line)
        if line is not None:
            self.send(line)


class LineBridgeFactory(RawMemberFactory):
    """
    Builds :class:`LineBridgeProtocol` instances on a shared hub.

    :param max_line_length: longest line accepted, in bytes (line end excluded).
    """

    protocol = LineBridgeProtocol
    listener = "line bridge"
    refusal = staticmethod(lambda reason: _error_line(reason + "; closing"))

    def __init__(
        self,
        hub: Hub,
        clock: IReactorTime,
        max_line_length: int = 64 * 1024,
        limits: Limits = Limits(),
        admission: Optional[Admission] = None,
        anonymous: Grants = EVERYTHING,
        authenticator: Optional[SignIn] = None,
    ) -> None:
        super().__init__(hub, clock, limits, admission, anonymous, authenticator)
        self.max_line_length = max_line_length
