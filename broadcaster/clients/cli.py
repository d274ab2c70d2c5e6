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
any other header, e.g. for authentication.

Exit status:

=== ====================================================================
0   finished cleanly (the close handshake completed)
1   cannot connect: DNS, TCP or TLS failure, or no HTTP answer at all
2   usage error
3   the server refused the WebSocket handshake (the message gives the
    HTTP status and reason, e.g. ``403``), or its answer was not a valid
    handshake, or it did not accept ``broadcaster.json`` for ``--json``
4   the server closed the connection (other than a normal 1000 close
    while reading stdin), or it was lost without a close handshake
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
from typing import Callable, Deque, Generator, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import error
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python import usage
from zope.interface import implementer

from broadcaster import __version__
from broadcaster.core.coercions import positive_float, positive_int
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
        "--send timed out, 130 interrupted."
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self["headers"] = []
        self["url"] = None

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
    """

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


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
        self.transport.resumeProducing()

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        self._on_line(line.decode("utf-8", "replace"))

    def readConnectionLost(self) -> None:
        rest = self.clearLineBuffer()
        if rest:
            self.lineReceived(rest)
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


class BroadcastClientProtocol(WebSocketClientProtocol):
    """
    One run of the client: send what the mode says, print what arrives, close
    when done, and report how it went through :attr:`finished`.

    :ivar finished: fires with ``None`` after a clean close, or fails with
        :class:`ClientError`.
    """

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.finished: Deferred = Deferred()
        self._opened = False
        self._closing = False
        self._error: Optional[ClientError] = None
        self._member_id: Optional[str] = None
        self._awaited: Deque[str] = deque()
        self._timeout_call = None

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
        if factory.texts is None:
            factory.console.start_reading(self.send_text, self.close)
            return
        self._awaited.extend(factory.texts)
        for text in factory.texts:
            self.send_text(text)
        self._timeout_call = factory.clock.callLater(factory.timeout, self._timed_out)

    def send_text(self, text: str) -> None:
        """
        Send one message in this connection's format.
        """
        if self._closing:
            return
        if self.factory.json:
            payload = json.dumps({"type": "message", "text": text}, ensure_ascii=False)
        else:
            payload = text
        self.sendMessage(payload.encode("utf-8"))

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
        # Re-encoded so that each event is exactly one line whatever the
        # server's formatting.
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        console.print_line(line if self.factory.raw else json_safe(line))
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "welcome" and self._member_id is None:
            self._member_id = event.get("id")
        elif (
            kind == "message"
            and self._member_id is not None
            and event.get("from") == self._member_id
        ):
            self._arrived(event.get("text"))

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
        What the run amounted to, once the connection is closed.
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
            if code == 1000 and self.factory.texts is None:
                # A server ending the session normally; nothing of ours is lost.
                return None
            return ClientError(
                "{}: the server closed the connection: {} {}".format(url, code, reason or ""),
                EXIT_CONNECTION,
            )
        return ClientError("{}: connection lost: {}".format(url, reason), EXIT_CONNECTION)

    def _handshake_failure(self, reason: Optional[str]) -> ClientError:
        url = self.factory.url
        # Autobahn's ``reason`` wraps this in 'connection was closed uncleanly'.
        reason = getattr(self, "wasNotCleanReason", None) or reason
        status_line = getattr(self, "http_status_line", None)
        if not status_line:
            return ClientError(
                "cannot connect to {}: {}".format(url, reason),
                EXIT_CANNOT_CONNECT,
            )
        _, _, status = status_line.partition(" ")
        if status.split(" ", 1)[0] != "101":
            return ClientError(
                "{}: handshake refused: {}".format(url, status.strip()), EXIT_HANDSHAKE
            )
        return ClientError("{}: handshake failed: {}".format(url, reason), EXIT_HANDSHAKE)

    def _cancel_timeout(self) -> None:
        if self._timeout_call is not None:
            self._timeout_call.cancel()
            self._timeout_call = None


class BroadcastClientFactory(WebSocketClientFactory):
    """
    Builds the one :class:`BroadcastClientProtocol` of a run and holds its
    settings.

    :ivar texts: the messages ``--send`` sends, or ``None`` to send stdin.
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


@inlineCallbacks
def run(reactor, options: Options, stdio=None) -> Generator:
    """
    Connect, run the mode the options ask for, and close.

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
    factory = BroadcastClientFactory(
        url,
        console,
        reactor,
        json=options["json"],
        texts=texts,
        timeout=options["timeout"],
        origin=options["origin"],
        headers=options["headers"],
        raw=options["raw"],
    )

    endpoint = client_endpoint(reactor, url, options["timeout"], options["trust_root"])
    connecting: Deferred = endpoint.connect(factory)
    protocol: Optional[BroadcastClientProtocol] = None
    interrupted: List[Deferred] = []

    def on_shutdown() -> Deferred:
        # Ctrl-C or SIGTERM: say goodbye properly rather than just vanish,
        # and hold the shutdown until stdout is flushed.
        d: Deferred = Deferred()
        interrupted.append(d)
        if protocol is None:
            connecting.cancel()
        else:
            protocol.close(ClientError("interrupted", EXIT_INTERRUPTED))
        return d

    trigger = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    status, message = EXIT_OK, None
    try:
        try:
            protocol = yield connecting
        except Exception as e:
            if interrupted:
                raise ClientError("interrupted", EXIT_INTERRUPTED)
            raise ClientError(
                "cannot connect to {}: {}".format(
                    url, _describe_connect_error(e, options["timeout"])
                ),
                EXIT_CANNOT_CONNECT,
            )
        yield protocol.finished
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


def _start_debug_log() -> None:
    import txaio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
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
        _start_debug_log()
    react(run, [options])


if __name__ == "__main__":
    main()
