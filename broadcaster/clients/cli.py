"""
``broadcaster-client``: a command-line WebSocket client for broadcaster.

Usage::

    broadcaster-client [options] ws://host:port/
    python -m broadcaster.clients.cli [options] ws://host:port/

Modes:

- By default each line read from stdin (UTF-8; invalid bytes become U+FFFD)
  is sent as one text message.  At end of input (Ctrl-D, or the end of a
  pipe) the client closes the WebSocket with code 1000, waits for the
  server's answer to the close, and exits.
- ``--send TEXT --count N`` sends ``TEXT 0`` .. ``TEXT N-1`` instead of
  reading stdin, the classic TwistedWebsocket example.  The server sends
  every message back to everyone, the sender included, so the client waits
  until all N have come back (or ``--timeout`` seconds pass), then closes
  with code 1000.  In plain mode "ours" means a text equal to the next one we
  sent, since plain mode does not say who sent what.
- ``--json`` speaks the ``broadcaster.json`` subprotocol: it sends
  ``{"type": "message", "text": ...}`` and counts as ours the ``message``
  events whose ``from`` is the id the server's ``welcome`` gave us.

Output: stdout carries only what the server sends, one message per line.  In
plain mode text is printed as-is and a binary message as ``<binary N
bytes>``.  In JSON mode each event is one JSON line; the binary message that
follows a ``binary`` event is not printed, since the event already gives its
size and stdout stays pure JSON lines.  Diagnostics go to stderr as one line
starting ``broadcaster-client:``; ``--debug`` adds a log of the connection.

``wss://`` URLs are checked against the system's trust roots and the host
name; ``--cacert`` names a PEM certificate to trust instead (a self-signed
test server's).

``--origin`` sends an ``Origin`` header as a browser on that site would, to
test a server's origin policy; ``--header 'Name: value'`` (repeatable) sends
any other header.  ``--name NAME`` adds ``?name=NAME`` to the URL (the
display name others see).  ``--token TOKEN`` sends ``Authorization: Bearer
TOKEN`` (see the server's ``--jwt-*`` options); ``--token-file PATH`` reads
the token from a file instead, so that it is not on the command line for
``ps`` to show.

Rooms (``--json`` only; plain mode has only the lobby, so there these are
usage errors):

- ``--room NAME`` (repeatable) joins room ``NAME`` once the ``welcome`` has
  arrived, and again after every reconnect.  Every room's events are
  printed, each with its ``room``.
- ``--to NAME`` sends the stdin lines (or ``--send``'s messages) to room
  ``NAME`` instead of the lobby, joining it as ``--room`` would.  Sending
  starts once the joins are asked for, so the first line is not refused.

Reconnecting: with ``--reconnect``, a connection that drops after it was
open (lost without a close handshake, the server restarting or closing it)
is made again, and again until it works:

- Attempt ``n`` (from 0) waits a random time between 0 and
  ``min(MAX, 0.5 * 2**n)`` seconds, ``MAX`` being ``--reconnect-max``
  (default 30): exponential backoff with full jitter, so that a server
  that comes back is not met by all its clients at once.  The waits start again from the
  shortest once a connection has stayed up ``MAX`` seconds.
- With ``--json`` every room is recovered: the lobby with ``?since=`` in
  the URL, the others with ``since`` in their joins, so what was said
  meanwhile is printed once, ahead of anything new; a message already
  printed is never printed again.  The server's ``welcome`` and
  ``recovered`` events are printed as they come, so stdout stays one JSON
  event per line.  Plain mode recovers nothing: what was said while it was
  away is lost.
- Stderr gets ``broadcaster-client: reconnected after S s (attempt K)``
  for each reconnect (``K``: attempts since the drop), and
  ``broadcaster-client: recovery of room 'R' incomplete: some messages were
  lost`` when the server no longer has everything that was missed (it
  restarted, or its history is shorter than the gap).
- Not reconnected: the first connection (a wrong URL fails at once), a
  close by the server with 4001 (token expired: the same token would be
  refused) or 4003 (disconnected by the server), and a handshake refused
  with an HTTP 4xx status (401, 403...); these exit as below.  Stdin is not
  read while there is no connection, and ``--send`` cannot be combined
  with ``--reconnect``.

Exit status:

=== ====================================================================
0   finished cleanly (the close handshake completed)
1   cannot connect: DNS, TCP or TLS failure, or no HTTP answer at all
2   usage error
3   the server refused the WebSocket handshake (the message gives the
    HTTP status and reason, e.g. ``403``), or its answer was not a valid
    handshake, or it did not accept ``broadcaster.json`` for ``--json``;
    with ``--reconnect``, also when a reconnect is refused with a 4xx
    status (a 5xx is tried again)
4   the server closed the connection (other than a normal 1000 close
    while reading stdin), or it was lost without a close handshake; with
    ``--reconnect`` only for a close with 4001 or 4003
5   ``--send``: not all our messages came back within ``--timeout``
70  internal error (a bug): a traceback is printed
130 interrupted (SIGINT or SIGTERM); the WebSocket is still closed
    with 1000 first
=== ====================================================================
"""

from __future__ import annotations

import getopt
import json
import sys
import traceback
from collections import deque
from typing import Callable, Deque, Dict, Generator, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import error
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from broadcaster import __version__
from broadcaster.clients import backoff
from broadcaster.clients.backoff import Backoff
from broadcaster.clients.recovery import Positions
from broadcaster.core.coercions import positive_float, positive_int
from broadcaster.core.names import LOBBY, InvalidName, check_room
from broadcaster.core.text import escape_controls, json_safe
from broadcaster.protocols.wire import JSON_SUBPROTOCOL

PROGRAM = "broadcaster-client"

EXIT_OK = 0
EXIT_CANNOT_CONNECT = 1
EXIT_USAGE = 2
EXIT_HANDSHAKE = 3
EXIT_CONNECTION = 4
EXIT_TIMEOUT = 5
EXIT_SOFTWARE = 70
EXIT_INTERRUPTED = 130

# Headers the WebSocket handshake itself is made of: a second copy from
# --header would make the request invalid.
_RESERVED_HEADERS = frozenset(
    [
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
    ]
)
# RFC 9110 token characters, what a header name is made of.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _no_line_breaks(value: str) -> bool:
    return "\r" not in value and "\n" not in value


class Options(usage.Options):
    """
    Options for ``broadcaster-client``.
    """

    synopsis = "Usage: {} [options] ws://host:port/".format(PROGRAM)
    longdesc = (
        "Connects to a broadcaster server (or any WebSocket server).  Sends each "
        "line of stdin as a message, or with --send a numbered series of "
        "messages, and prints every message received on stdout, one per line.  "
        "Exit status: 0 clean close, 1 cannot connect, 2 usage error, 3 "
        "handshake refused, 4 connection closed by the server or lost, 5 "
        "--send timed out, 130 interrupted.  With --reconnect a dropped "
        "connection is made again and, with --json, its rooms recovered."
    )

    optFlags = [
        [
            "json",
            "j",
            "Use the broadcaster.json subprotocol: send "
            '{"type": "message", "text": ...} and print each event as a JSON line.',
        ],
        ["debug", None, "Log the connection and Autobahn's protocol chatter to stderr."],
        [
            "raw",
            None,
            "Print what others send as it is, control characters and all (for "
            "pipes).  By default they are printed as escapes such as \\x1b, so "
            "that nobody can send your terminal escape sequences.",
        ],
        [
            "reconnect",
            None,
            "When the connection drops, connect again with backoff (see "
            "--reconnect-max) and, with --json, recover every room.",
        ],
    ]

    optParameters = [
        [
            "send",
            "s",
            None,
            "Send 'TEXT 0' .. 'TEXT N-1' (N from --count) instead of reading "
            "stdin, wait until they all come back, then close and exit.",
        ],
        ["count", "n", None, "How many messages --send sends; default 1", positive_int],
        [
            "timeout",
            "t",
            10.0,
            "Seconds to allow for connecting, for the handshake, and with "
            "--send for our messages to come back.",
            positive_float,
        ],
        [
            "cacert",
            None,
            None,
            "For wss: trust the CA certificate (or self-signed server "
            "certificate) in this PEM file instead of the system's trust roots.",
        ],
        [
            "origin",
            None,
            None,
            "Send this Origin header, as a browser on that site would, e.g. "
            "http://evil.example (to test a server's origin policy).",
        ],
        ["name", None, None, "Your display name: adds ?name=NAME to the URL."],
        [
            "to",
            None,
            None,
            "With --json: send to this room instead of the lobby (joining it).",
        ],
        [
            "token",
            None,
            None,
            "Send 'Authorization: Bearer TOKEN' (a signed token; see the server's "
            "--jwt-* options).  --token-file keeps it out of ps.",
        ],
        ["token-file", None, None, "Read the token for --token from this file."],
        [
            "reconnect-max",
            None,
            None,
            "With --reconnect: the longest wait between attempts, in seconds "
            "(default {:g})".format(backoff.MAXIMUM),
            positive_float,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["headers"] = []
        self["url"] = None
        self["rooms"] = []

    def opt_room(self, room: str) -> None:
        """With --json: join this room, and again after each reconnect (repeatable)."""
        try:
            self["rooms"].append(check_room(room))
        except InvalidName as e:
            raise usage.UsageError("--room {!r}: {}".format(room, e))

    def opt_header(self, header: str) -> None:
        """Send an extra handshake header, 'Name: value', e.g. 'Authorization: Bearer xyz' (repeatable)."""  # noqa: E501
        name, colon, value = header.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not name or not set(name) <= _TOKEN or not _no_line_breaks(value):
            raise usage.UsageError(
                "--header {!r} is not 'Name: value' (e.g. 'Authorization: Bearer xyz')".format(
                    header
                )
            )
        lowered = name.lower()
        if lowered == "origin":
            raise usage.UsageError("--header cannot set Origin: use --origin")
        if lowered in _RESERVED_HEADERS:
            raise usage.UsageError(
                "--header cannot set {}: the WebSocket handshake sets it".format(name)
            )
        if any(existing.lower() == lowered for existing, _ in self["headers"]):
            raise usage.UsageError("--header {} is given twice".format(name))
        self["headers"].append((name, value))

    opt_H = opt_header

    def opt_version(self) -> None:
        """Display the version and exit."""
        print("{} {}".format(PROGRAM, __version__))
        sys.exit(0)

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """
        Accept options after the URL too (``broadcaster-client URL --send
        Hello``), as users of most command-line tools expect; Twisted's
        parser alone stops at the first argument that is not an option.
        """
        if options is None:
            options = sys.argv[1:]
        try:
            pairs, arguments = getopt.gnu_getopt(list(options), self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e))
        takes_value = {"--" + name[:-1] for name in self.longOpt if name.endswith("=")}
        takes_value |= {"-" + self.shortOpt[i - 1] for i, c in enumerate(self.shortOpt) if c == ":"}
        ordered: List[str] = []
        for option, value in pairs:
            ordered.append(option)
            if option in takes_value:
                ordered.append(value)
        super().parseOptions(ordered + ["--"] + arguments)

    def parseArgs(self, *urls: str) -> None:
        if len(urls) != 1:
            raise usage.UsageError(
                "give exactly one WebSocket URL, e.g. ws://localhost:9999/ "
                "(got {})".format(len(urls))
            )
        self["url"] = urls[0]

    def postOptions(self) -> None:
        self["url"] = parse_websocket_url(self["url"])
        if self["count"] is not None and self["send"] is None:
            raise usage.UsageError("--count only makes sense with --send TEXT")
        if self["count"] is None:
            self["count"] = 1
        if self["cacert"] is not None:
            if not self["url"].secure:
                raise usage.UsageError("--cacert only makes sense with a wss:// URL")
            self["trust_root"] = load_certificate(self["cacert"])
        else:
            self["trust_root"] = None
        origin = self["origin"]
        if origin is not None and (not origin or not _no_line_breaks(origin)):
            raise usage.UsageError("--origin {!r} must be one non-empty line".format(origin))
        self._check_rooms()
        self._check_reconnect()
        token = self._token()
        if token is not None:
            if any(name.lower() == "authorization" for name, _ in self["headers"]):
                raise usage.UsageError("give the token with --token or --header, not both")
            self["headers"].append(("Authorization", "Bearer " + token))
        if self["name"] is not None:
            if not self["name"].strip():
                raise usage.UsageError("--name must not be empty")
            self["url"] = parse_websocket_url(with_query(self["url"], name=self["name"]))

    def _check_rooms(self) -> None:
        if self["to"] is not None:
            try:
                check_room(self["to"])
            except InvalidName as e:
                raise usage.UsageError("--to {!r}: {}".format(self["to"], e))
        if not self["json"]:
            for flag, given in (("--room", self["rooms"]), ("--to", self["to"])):
                if given:
                    raise usage.UsageError(
                        "{} needs --json: plain mode has only the lobby".format(flag)
                    )
        if self["to"] is None:
            self["to"] = LOBBY

    def _check_reconnect(self) -> None:
        if not self["reconnect"]:
            if self["reconnect-max"] is not None:
                raise usage.UsageError("--reconnect-max only makes sense with --reconnect")
            return
        if self["send"] is not None:
            raise usage.UsageError(
                "--send cannot be combined with --reconnect: it ends once its "
                "messages come back"
            )
        if self["reconnect-max"] is None:
            self["reconnect-max"] = backoff.MAXIMUM

    def _token(self) -> Optional[str]:
        """
        The token of --token or --token-file, checked to be one word.
        """
        if self["token"] is not None and self["token-file"] is not None:
            raise usage.UsageError("give --token or --token-file, not both")
        if self["token-file"] is not None:
            flag, token = "--token-file", read_token(self["token-file"])
        elif self["token"] is not None:
            flag, token = "--token", self["token"].strip()
        else:
            return None
        # Never quoted in messages: it is a secret.
        if not token:
            raise usage.UsageError("{}: the token is empty".format(flag))
        if not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
            raise usage.UsageError("{}: the token must be one word, without spaces".format(flag))
        return token


class WebSocketURL(str):
    """
    A ``ws://`` or ``wss://`` URL (the string itself), with its parts.

    :ivar secure: whether it is ``wss``.
    :ivar host: the host name or IP address, without IPv6 brackets.
    :ivar port: the port, 80 or 443 when the URL gives none.
    """

    secure: bool
    host: str
    port: int


def parse_websocket_url(url: str) -> WebSocketURL:
    """
    Check that ``url`` is a WebSocket URL we can connect to.

    :raise usage.UsageError: naming the URL and what is wrong with it.
    """
    example = "use ws://host:port/ or wss://host:port/, e.g. ws://localhost:9999/"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise usage.UsageError("URL {!r} is not valid ({}): {}".format(url, e, example))
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise usage.UsageError("URL {!r} is not a WebSocket URL: {}".format(url, example))
    if not parts.hostname:
        raise usage.UsageError("URL {!r} has no host: {}".format(url, example))
    if parts.fragment:
        raise usage.UsageError(
            "URL {!r} has a #fragment, which WebSocket URLs cannot have".format(url)
        )
    if port == 0:
        raise usage.UsageError("URL {!r} has port 0: {}".format(url, example))
    parsed = WebSocketURL(url)
    parsed.secure = scheme == "wss"
    parsed.host = parts.hostname
    parsed.port = port if port is not None else (443 if parsed.secure else 80)
    return parsed


def with_query(url: str, **params: str) -> str:
    """
    ``url`` with each of ``params`` set in its query string (replacing any
    value it had), its other parameters kept.
    """
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def read_token(path: str) -> str:
    """
    The token in the file at ``path``, without surrounding white space.

    :raise usage.UsageError: naming ``--token-file`` (never quoting the file's
        content) when it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read(65536).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not ASCII text"
        raise usage.UsageError("--token-file {!r}: cannot read a token ({})".format(path, reason))


def load_certificate(path: str):
    """
    Read a PEM certificate to trust for ``wss``.

    :raise usage.UsageError: naming ``--cacert`` when it cannot be read.
    """
    from twisted.internet.ssl import Certificate

    try:
        with open(path, "rb") as f:
            return Certificate.loadPEM(f.read())
    except Exception as e:  # missing file, not PEM, not a certificate...
        raise usage.UsageError("--cacert {!r}: cannot read a PEM certificate ({})".format(path, e))


class ClientError(Exception):
    """
    A run that did not finish cleanly.

    ``str()`` is the one-line message for stderr; :attr:`exit_status` is the
    process's exit status.

    :ivar retry: whether ``--reconnect`` should try again rather than end
        the run: the connection dropped, or its replacement could not be
        made for a reason that may pass (the server is down or busy).
    """

    def __init__(self, message: str, exit_status: int, retry: bool = False) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.retry = retry


def _ignore(*args: object) -> None:
    pass


@implementer(IHalfCloseableProtocol)
class Console(LineReceiver):
    """
    Stdin lines in, received messages out, over one non-blocking
    :class:`twisted.internet.stdio.StandardIO` so the reactor never waits on
    the terminal or a pipe.

    Stdin is not read until :meth:`start_reading`: in ``--send`` mode never,
    otherwise only once there is a WebSocket to send lines on.
    """

    delimiter = b"\n"
    # No limit of our own: the input is the user's, and the limit that
    # matters is the server's, which it enforces with a 1009 close.
    # (LineReceiver's default of 16 KiB would close stdout and stdin.)
    MAX_LENGTH = sys.maxsize

    def __init__(self) -> None:
        self._on_line: Callable[[str], None] = _ignore
        self._on_eof: Callable[[], None] = _ignore
        self._at_eof = False
        self._stdout_open = True
        self._flushed: List[Deferred] = []

    def connectionMade(self) -> None:
        self.transport.pauseProducing()

    def start_reading(self, on_line: Callable[[str], None], on_eof: Callable[[], None]) -> None:
        """
        Read stdin from now on.

        :param on_line: called with each line, without its line ending.
        :param on_eof: called once at the end of stdin, after the last line
            (which may lack a newline).
        """
        self._on_line = on_line
        self._on_eof = on_eof
        if self._at_eof:
            # The end came while nobody was reading (see stop_reading).
            self._on_eof = _ignore
            on_eof()
            return
        self.transport.resumeProducing()

    def stop_reading(self) -> None:
        """
        Leave stdin unread until :meth:`start_reading` again: the connection
        lines were sent on is gone, and lines left in the pipe meanwhile go
        to the next one rather than nowhere.
        """
        self._on_line = _ignore
        self._on_eof = _ignore
        self.transport.pauseProducing()

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        self._on_line(line.decode("utf-8", "replace"))

    def readConnectionLost(self) -> None:
        rest = self.clearLineBuffer()
        if rest:
            self.lineReceived(rest)
        self._at_eof = True
        on_eof, self._on_eof = self._on_eof, _ignore
        on_eof()

    def print_line(self, text: str) -> None:
        """
        Write ``text`` and a newline to stdout (dropped once stdout is closed).
        """
        if self._stdout_open:
            self.transport.write(text.encode("utf-8", "replace") + b"\n")

    def finish(self) -> Deferred:
        """
        Stop reading stdin and close stdout once everything printed is written.

        The reactor throws away unwritten output when it stops, so the
        program waits for this before exiting.

        :return: a Deferred that fires when stdout is flushed and closed.
        """
        if not self._stdout_open:
            return succeed(None)
        d: Deferred = Deferred()
        self._flushed.append(d)
        self.transport.loseConnection()
        return d

    def writeConnectionLost(self) -> None:
        self._stdout_closed()

    def connectionLost(self, reason: object = None) -> None:
        self._stdout_closed()

    def _stdout_closed(self) -> None:
        self._stdout_open = False
        flushed, self._flushed = self._flushed, []
        for d in flushed:
            d.callback(None)


#: Close codes after which --reconnect gives up: the server meant it.
_FINAL_CLOSES = {
    4001: "the token expired",
    4003: "disconnected by the server",
}


class BroadcastClientProtocol(WebSocketClientProtocol):
    """
    One connection of a run: send what the mode says, print what arrives,
    close when done, and report how it went through :attr:`finished`.

    :ivar opened: fires with this protocol once the WebSocket is open (and,
        for ``--json``, speaks ``broadcaster.json``); never, if it does not
        open.
    :ivar finished: fires with ``None`` after a clean close, or fails with
        :class:`ClientError`.
    """

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred = Deferred()
        self.finished: Deferred = Deferred()
        self._opened = False
        self._closing = False
        self._error: Optional[ClientError] = None
        self._member_id: Optional[str] = None
        self._welcomed_already = False
        self._awaited: Deque[str] = deque()
        self._timeout_call = None
        # room -> (epoch, seq) where its welcome or presence said it stood
        # on this connection: where a replay from a lost epoch leaves it.
        self._announced: Dict[str, Tuple[object, object]] = {}

    def onOpen(self) -> None:
        self._opened = True
        factory = self.factory
        self._log.info(
            "connected to {url} (subprotocol {subprotocol})",
            url=factory.url,
            subprotocol=self.websocket_protocol_in_use or "none",
        )
        if factory.json and self.websocket_protocol_in_use != JSON_SUBPROTOCOL:
            self.close(
                ClientError(
                    "{}: the server did not accept the {} subprotocol".format(
                        factory.url, JSON_SUBPROTOCOL
                    ),
                    EXIT_HANDSHAKE,
                )
            )
            return
        if factory.texts is not None:
            self._awaited.extend(factory.texts)
            self._timeout_call = factory.clock.callLater(factory.timeout, self._timed_out)
        self.opened.callback(self)
        if not factory.json:
            self._start_sending()
        # In JSON mode the welcome, always the first event, starts it.

    def _start_sending(self) -> None:
        """
        Send ``--send``'s messages, or start sending stdin.
        """
        factory = self.factory
        if factory.texts is None:
            factory.console.start_reading(self.send_text, self.close)
            return
        for text in factory.texts:
            self.send_text(text)

    def send_text(self, text: str) -> None:
        """
        Send one message in this connection's format.
        """
        if self._closing:
            return
        if not self.factory.json:
            self.sendMessage(text.encode("utf-8"))
            return
        request = {"type": "message", "text": text}
        if self.factory.to != LOBBY:
            request["room"] = self.factory.to
        self._send_json(request)

    def _send_json(self, request: Dict[str, object]) -> None:
        self.sendMessage(json.dumps(request, ensure_ascii=False).encode("utf-8"))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        console = self.factory.console
        if isBinary:
            if not self.factory.json:
                console.print_line("<binary {} bytes>".format(len(payload)))
            return
        text = payload.decode("utf-8")
        shown = text if self.factory.raw else escape_controls(text)
        if not self.factory.json:
            console.print_line(shown)
            self._arrived(text)
            return
        try:
            event = json.loads(text)
        except ValueError:
            self._log.warn("the server sent a text message that is not JSON")
            console.print_line(shown)
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "message" and not self.factory.positions.saw(event):
            # Replayed after a reconnect, but printed before the drop.
            self._log.debug(
                "dropped a message already printed ({room} {seq})",
                room=event.get("room"),
                seq=event.get("seq"),
            )
            return
        # Re-encoded so that each event is exactly one line whatever the
        # server's formatting.
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        console.print_line(line if self.factory.raw else json_safe(line))
        if kind == "welcome":
            self._welcomed(event)
        elif kind == "presence":
            self._stands(event.get("room"), event)
        elif kind == "recovered":
            self._recovered(event)
        elif (
            kind == "message"
            and self._member_id is not None
            and event.get("from") == self._member_id
        ):
            self._arrived(event.get("text"))

    def _welcomed(self, welcome: Dict[str, object]) -> None:
        """
        The first event: join the rooms (asking for what was missed in
        them, after a reconnect), then start sending, so that nothing is
        sent to a room before its join.
        """
        if self._welcomed_already:
            return
        self._welcomed_already = True
        self._member_id = welcome.get("id")
        self._stands(LOBBY, welcome)
        for request in self.factory.positions.joins():
            self._send_json(request)
        self._start_sending()

    def _stands(self, room: object, event: Dict[str, object]) -> None:
        """
        A ``welcome`` or ``presence`` said where ``room`` stands now.
        """
        if not isinstance(room, str):
            return
        epoch, seq = event.get("epoch"), event.get("seq")
        self._announced.setdefault(room, (epoch, seq))
        self.factory.positions.started(room, epoch, seq)

    def _recovered(self, event: Dict[str, object]) -> None:
        room = event.get("room")
        if not isinstance(room, str):
            return
        if event.get("complete") is False:
            self.factory.warn(
                "recovery of room '{}' incomplete: some messages were lost".format(
                    escape_controls(room)
                )
            )
        if room in self._announced:
            self.factory.positions.recovered(room, *self._announced[room])

    def _arrived(self, text: object) -> None:
        """
        Tick off ``text`` if it is the next of ours still to come back, and
        close once all have.
        """
        if self._awaited and text == self._awaited[0]:
            self._awaited.popleft()
            if not self._awaited:
                self.close()

    def _timed_out(self) -> None:
        self._timeout_call = None
        total = len(self.factory.texts)
        self.close(
            ClientError(
                "{}: timed out after {:g}s: {} of our {} messages came back".format(
                    self.factory.url, self.factory.timeout, total - len(self._awaited), total
                ),
                EXIT_TIMEOUT,
            )
        )

    def close(self, reason: Optional[ClientError] = None) -> None:
        """
        Start the close handshake with code 1000; :attr:`finished` fires when
        it completes.

        :param reason: why, if the run failed: :attr:`finished` fails with it
            even though the close itself is clean.
        """
        if reason is not None and self._error is None:
            self._error = reason
        if self._closing:
            return
        self._closing = True
        self._cancel_timeout()
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        elif self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self._cancel_timeout()
        self._log.info(
            "connection closed: clean={clean} code={code} reason={reason!r}",
            clean=wasClean,
            code=code,
            reason=reason or "",
        )
        outcome = self._outcome(wasClean, code, reason)
        if outcome is None:
            self.finished.callback(None)
        else:
            self.finished.errback(outcome)

    def _outcome(
        self, wasClean: bool, code: Optional[int], reason: Optional[str]
    ) -> Optional[ClientError]:
        """
        What the connection amounted to, once it is closed.
        """
        url = self.factory.url
        if not self._opened:
            if self._error is not None:
                return self._error
            return self._handshake_failure(reason)
        if self._error is not None:
            return self._error
        if wasClean and self._closing:
            return None
        if wasClean:
            if code == 1000 and self.factory.texts is None and not self.factory.reconnect:
                # A server ending the session normally; nothing of ours is lost.
                return None
            return ClientError(
                "{}: the server closed the connection: {} {}".format(
                    url, code, reason or _FINAL_CLOSES.get(code, "")
                ).rstrip(),
                EXIT_CONNECTION,
                retry=code not in _FINAL_CLOSES,
            )
        return ClientError(
            "{}: connection lost: {}".format(url, reason),
            EXIT_CONNECTION,
            retry=not self._closing,
        )

    def _handshake_failure(self, reason: Optional[str]) -> ClientError:
        url = self.factory.url
        # Autobahn's ``reason`` wraps this in 'connection was closed uncleanly'.
        reason = getattr(self, "wasNotCleanReason", None) or reason
        status_line = getattr(self, "http_status_line", None)
        if not status_line:
            return ClientError(
                "cannot connect to {}: {}".format(url, reason), EXIT_CANNOT_CONNECT, retry=True
            )
        _, _, status = status_line.partition(" ")
        code = status.split(" ", 1)[0]
        if code != "101":
            # 5xx: busy or briefly unable to check sign-ins, worth another
            # try; 4xx: this request will be refused however often it comes.
            return ClientError(
                "{}: handshake refused: {}".format(url, status.strip()),
                EXIT_HANDSHAKE,
                retry=code.startswith("5"),
            )
        return ClientError("{}: handshake failed: {}".format(url, reason), EXIT_HANDSHAKE)

    def _cancel_timeout(self) -> None:
        if self._timeout_call is not None:
            self._timeout_call.cancel()
            self._timeout_call = None


def _warn(message: str) -> None:
    sys.stderr.write("{}: {}\n".format(PROGRAM, message))
    sys.stderr.flush()


class BroadcastClientFactory(WebSocketClientFactory):
    """
    Builds the :class:`BroadcastClientProtocol` of one connection and holds
    the run's settings.

    :ivar texts: the messages ``--send`` sends, or ``None`` to send stdin.
    :ivar positions: with ``json``, where the run stands in each room it
        wants to be in, kept across connections.
    """

    protocol = BroadcastClientProtocol

    def __init__(
        self,
        url: str,
        console: Console,
        clock: IReactorTime,
        json: bool = False,
        texts: Optional[Sequence[str]] = None,
        timeout: float = 10.0,
        origin: Optional[str] = None,
        headers: Iterable[Tuple[str, str]] = (),
        raw: bool = False,
        positions: Optional[Positions] = None,
        to: str = LOBBY,
        reconnect: bool = False,
        warn: Callable[[str], None] = _warn,
    ) -> None:
        extra = dict(headers)
        useragent = "{}/{}".format(PROGRAM, __version__)
        for name in list(extra):
            if name.lower() == "user-agent":
                useragent = extra.pop(name)
        super().__init__(
            url,
            origin=origin,
            protocols=[JSON_SUBPROTOCOL] if json else None,
            useragent=useragent,
            headers=extra,
            reactor=clock,
        )
        self.console = console
        self.clock = clock
        self.json = json
        #: Print what others send as it is (--raw), not with its control
        #: characters escaped.
        self.raw = raw
        self.texts = list(texts) if texts is not None else None
        self.timeout = timeout
        self.positions = positions if positions is not None else Positions()
        #: The room messages go to (--to).
        self.to = to
        #: Whether the run reconnects after a drop (--reconnect): then even
        #: a normal close by the server is a drop.
        self.reconnect = reconnect
        #: Writes one diagnostic line to stderr.
        self.warn = warn
        self.setProtocolOptions(
            openHandshakeTimeout=timeout,
            # How long the server may take to answer our close, then to drop
            # the TCP connection as RFC 6455 asks it to.
            closeHandshakeTimeout=5,
            serverConnectionDropTimeout=1,
            perMessageCompressionOffers=[],
        )


def client_endpoint(reactor, url: WebSocketURL, timeout: float, trust_root=None):
    """
    The endpoint for ``url``: TCP to any address family, wrapped in TLS with
    certificate and host name verification for ``wss``.

    (Autobahn's own ``connectWS`` would connect ``wss`` without verifying the
    certificate.)

    :param trust_root: the certificate to trust for ``wss``, instead of the
        platform's trust roots.
    """
    tcp = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if not url.secure:
        return tcp
    from twisted.internet.ssl import optionsForClientTLS

    return wrapClientTLS(optionsForClientTLS(url.host, trustRoot=trust_root), tcp)


def _describe_connect_error(e: BaseException, timeout: float) -> str:
    if isinstance(e, error.TimeoutError):
        return "no answer within {:g}s".format(timeout)
    if isinstance(e, error.ConnectError) and e.args and e.args[0]:
        return str(e.args[0])
    return str(e) or type(e).__name__


class Session:
    """
    A run over one connection or, with ``--reconnect``, as many as it takes:
    after a drop, wait as the :class:`~broadcaster.clients.backoff.Backoff`
    says (on ``clock``, so the reactor runs meanwhile) and connect again,
    until a connection ends the run (see the module docstring for which).

    :param connect: makes a connection to the URL it is given: a Deferred
        firing with its :class:`BroadcastClientProtocol`, or failing if TCP
        or TLS cannot be set up.
    :param positions: with ``--json``, the rooms' positions, for the
        lobby's ``?since=`` on each new connection.
    :param backoff: the waits between attempts; ``None``: never reconnect.
    :param warn: writes one diagnostic line to stderr.
    :ivar finished: fires with ``None`` after a clean run, or fails with
        :class:`ClientError`.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        connect: Callable[[str], Deferred],
        url: str,
        console: Console,
        positions: Optional[Positions] = None,
        backoff: Optional[Backoff] = None,
        timeout: float = 10.0,
        warn: Callable[[str], None] = _warn,
    ) -> None:
        self.finished: Deferred = Deferred()
        self._clock = clock
        self._connect_to = connect
        self._url = url
        self._console = console
        self._positions = positions
        self._backoff = backoff
        self._timeout = timeout
        self._warn = warn
        self._protocol: Optional[BroadcastClientProtocol] = None
        self._connecting: Optional[Deferred] = None
        self._next_attempt = None
        self._interrupted = False
        # When the last connection opened (None: none has yet), and when it
        # dropped, until another opens.
        self._opened_at: Optional[float] = None
        self._dropped_at: Optional[float] = None
        # Attempts since the drop.
        self._attempts = 0

    def start(self) -> None:
        """
        Make the first connection.
        """
        self._connect()

    def interrupt(self) -> None:
        """
        Ctrl-C or SIGTERM: close the connection with 1000, or stop making
        one, and end the run with :data:`EXIT_INTERRUPTED`.
        """
        if self.finished.called:
            return
        self._interrupted = True
        if self._protocol is not None:
            self._protocol.close(ClientError("interrupted", EXIT_INTERRUPTED))
        elif self._connecting is not None:
            self._connecting.cancel()
        elif self._next_attempt is not None:
            self._next_attempt.cancel()
            self._next_attempt = None
            self.finished.errback(ClientError("interrupted", EXIT_INTERRUPTED))

    def _connect(self) -> None:
        self._next_attempt = None
        url = self._url if self._positions is None else self._positions.url(self._url)
        self._connecting = self._connect_to(url)
        self._connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, protocol: BroadcastClientProtocol) -> None:
        self._connecting = None
        self._protocol = protocol
        protocol.opened.addCallback(self._opened)
        protocol.finished.addCallbacks(self._closed, self._dropped)

    def _not_connected(self, failure: Failure) -> None:
        self._connecting = None
        if self._interrupted:
            self.finished.errback(ClientError("interrupted", EXIT_INTERRUPTED))
            return
        self._ended(
            ClientError(
                "cannot connect to {}: {}".format(
                    self._url, _describe_connect_error(failure.value, self._timeout)
                ),
                EXIT_CANNOT_CONNECT,
                retry=True,
            )
        )

    def _opened(self, protocol: BroadcastClientProtocol) -> None:
        self._opened_at = self._clock.seconds()
        if self._dropped_at is not None:
            self._warn(
                "reconnected after {:.1f} s (attempt {})".format(
                    self._opened_at - self._dropped_at, self._attempts
                )
            )
            self._dropped_at = None
            self._attempts = 0

    def _closed(self, _: None) -> None:
        self._protocol = None
        self.finished.callback(None)

    def _dropped(self, failure: Failure) -> None:
        self._protocol = None
        # Until there is a connection again, lines wait in the pipe.
        self._console.stop_reading()
        if not failure.check(ClientError):
            self.finished.errback(failure)
            return
        self._ended(failure.value)

    def _ended(self, error: ClientError) -> None:
        """
        A connection, or an attempt at one, ended with ``error``: try
        again, or end the run with it.
        """
        if (
            self._backoff is None
            or self._opened_at is None  # the first connection: a wrong URL fails at once
            or self._interrupted
            or not error.retry
        ):
            self.finished.errback(error)
            return
        now = self._clock.seconds()
        if self._dropped_at is None:
            self._log.info("{error}; reconnecting", error=str(error))
            self._dropped_at = now
            if now - self._opened_at >= self._backoff.maximum:
                # It lasted: the server is not turning us away in a loop.
                self._backoff.reset()
        else:
            self._log.info("reconnect failed: {error}", error=str(error))
        self._attempts += 1
        self._next_attempt = self._clock.callLater(self._backoff.next(), self._connect)


@inlineCallbacks
def run(reactor, options: Options, stdio=None) -> Generator:
    """
    Connect, run the mode the options ask for (reconnecting if they say
    so), and close.

    :param stdio: makes the transport for the :class:`Console` (default
        :class:`twisted.internet.stdio.StandardIO`).
    :return: a Deferred that fires with ``None`` after a clean run, or fails
        with :class:`SystemExit` carrying the exit status, the message
        already written to stderr.
    """
    if stdio is None:
        from twisted.internet.stdio import StandardIO as stdio

    url: WebSocketURL = options["url"]
    console = Console()
    stdio(console, reactor=reactor)
    texts = None
    if options["send"] is not None:
        texts = ["{} {}".format(options["send"], i) for i in range(options["count"])]
    positions = Positions(options["rooms"] + [options["to"]]) if options["json"] else None

    def factory(url: str) -> BroadcastClientFactory:
        return BroadcastClientFactory(
            url,
            console,
            reactor,
            json=options["json"],
            texts=texts,
            timeout=options["timeout"],
            origin=options["origin"],
            headers=options["headers"],
            raw=options["raw"],
            positions=positions,
            to=options["to"],
            reconnect=options["reconnect"],
        )

    endpoint = client_endpoint(reactor, url, options["timeout"], options["trust_root"])
    waits = None
    if options["reconnect"]:
        maximum = options["reconnect-max"]
        waits = Backoff(initial=min(backoff.INITIAL, maximum), maximum=maximum)
    session = Session(
        reactor,
        lambda url: endpoint.connect(factory(url)),
        url,
        console,
        positions=positions,
        backoff=waits,
        timeout=options["timeout"],
    )
    interrupted: List[Deferred] = []

    def on_shutdown() -> Deferred:
        # Ctrl-C or SIGTERM: say goodbye properly rather than just vanish,
        # and hold the shutdown until stdout is flushed.
        d: Deferred = Deferred()
        interrupted.append(d)
        session.interrupt()
        return d

    trigger = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    status, message = EXIT_OK, None
    try:
        session.start()
        yield session.finished
    except ClientError as e:
        status, message = e.exit_status, str(e)
    except Exception:
        status, message = EXIT_SOFTWARE, "internal error:\n" + traceback.format_exc()
    yield console.finish()
    if message is not None:
        sys.stderr.write("{}: {}\n".format(PROGRAM, message.rstrip()))
    if interrupted:
        for d in interrupted:
            d.callback(None)
    else:
        reactor.removeSystemEventTrigger(trigger)
    if status != EXIT_OK:
        raise SystemExit(status)


#: Headers whose values are credentials, never to be logged.
_CREDENTIAL_HEADERS = frozenset(["authorization", "proxy-authorization", "cookie"])


def _start_debug_log(headers: Iterable[Tuple[str, str]] = ()) -> None:
    """
    Log to stderr, Autobahn's chatter included, with the values of the
    credential ``headers`` (``--token``'s among them) redacted: Autobahn
    logs the whole handshake request, and debug logs get pasted into bug
    reports.
    """
    import txaio
    from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner

    secrets = [value for name, value in headers if name.lower() in _CREDENTIAL_HEADERS and value]

    def redacted(event: dict) -> Optional[str]:
        text = formatEventAsClassicLogText(event)
        for secret in secrets:
            text = text and text.replace(secret, "<redacted>")
        return text

    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stderr, redacted)], redirectStandardIO=False
    )
    txaio.set_global_log_level("debug")


def main(argv: Optional[List[str]] = None) -> None:
    """
    The ``broadcaster-client`` console script; exits the process.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    """
    from twisted.internet.task import react

    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write("{}\n{}: {}\n".format(options, PROGRAM, e))
        sys.exit(EXIT_USAGE)
    if options["debug"]:
        _start_debug_log(options["headers"])
    react(run, [options])


if __name__ == "__main__":
    main()
