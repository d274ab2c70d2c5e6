"""
The command-line options of ``twistd broadcaster``: every flag, its type
and default, and the checks that refuse a bad combination with a message
naming the flag (:class:`Options`).  :mod:`broadcaster.service.tap` builds
the server from them.
"""

from __future__ import annotations

import dataclasses
import getopt
import os
import sys
from typing import Mapping, Optional

from twisted.python import usage

from broadcaster.core.coercions import (
    byte_count,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from broadcaster.core.history import DEFAULT_MEMORY, KEPT_OVERHEAD
from broadcaster.core.permissions import EVERYTHING, parse_grants
from broadcaster.core.imaging import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_PIXELS,
    KNOWN_FORMATS,
    MAX_BYTES_PER_PIXEL,
)
from broadcaster.http import tokens
from broadcaster.http.fetch import url_problem
from broadcaster.http.webhooks import DEFAULT_QUEUE_BYTES
from broadcaster.protocols.origin import allowed_host_name, parse_origin
from broadcaster.redis.address import parse_redis_url, redact_url
from broadcaster.service import logs, secrets
from broadcaster.service.listening import check_endpoint, with_backlog
from broadcaster.service.workers import (
    LISTENER_FLAGS,
    NO_REDIS,
    find_redis_server,
    parse_worker_fds,
    sharing_problem,
)


def image_formats(value: str) -> tuple:
    """
    ``--image-formats``: Pillow format names, from a comma-separated list.

    :raise ValueError: naming an unknown format.
    """
    names = tuple(dict.fromkeys(part.strip().upper() for part in value.split(",") if part.strip()))
    if not names:
        raise ValueError("name at least one format")
    unknown = [name for name in names if name not in KNOWN_FORMATS]
    if unknown:
        raise ValueError(
            "unknown image format {}; choose from {}".format(
                ", ".join(unknown).lower(), ", ".join(KNOWN_FORMATS).lower()
            )
        )
    return names


image_formats.coerceDoc = "Of: {}.".format(  # type: ignore[attr-defined]
    ", ".join(name.lower() for name in KNOWN_FORMATS)
)


class Options(usage.Options):
    """
    Options for ``twistd broadcaster``.
    """

    synopsis = "[options]"
    longdesc = (
        "Runs a chat/broadcast server: every WebSocket message is sent to every "
        "client.  The chat page and the WebSocket endpoint share --port: open "
        "http://localhost:9999/ in a browser or connect to ws://localhost:9999/."
    )

    optFlags = [
        [
            "no-metrics",
            None,
            "Do not serve Prometheus metrics at /metrics.",
        ],
        [
            "no-admin",
            None,
            "Do not serve the operator dashboard at /admin (served by default "
            "when API keys are configured: they sign operators in; without a "
            "key it is off).",
        ],
        [
            "compression",
            None,
            "Accept permessage-deflate compression (off by default: it costs "
            "CPU per recipient).  Decompressed messages are still limited by "
            "--max-message-size.",
        ],
        [
            "debug",
            None,
            "Also log every message and HTTP request (sizes and peers, never "
            "payloads) and Autobahn's own protocol chatter.",
        ],
        [
            "allow-private-fetch",
            None,
            "Let image_url requests fetch from private, loopback, link-local "
            "and other non-public addresses (refused by default: clients could "
            "otherwise make the server reach into its own network).",
        ],
        [
            "anonymous-raw-ports",
            None,
            "With --auth-url or --jwt-*, still open the image port and the "
            "line bridge: their clients cannot sign in, so they are anonymous "
            "members of the lobby.  Without this flag those ports stay off "
            "when clients must sign in.",
        ],
        [
            "jwt-allow-no-exp",
            None,
            "Accept tokens without an exp claim (by default exp is required: "
            "a token without one is valid for ever).",
        ],
    ]

    optParameters = [
        [
            "port",
            "p",
            "tcp:9999",
            "Where the WebSocket endpoint and chat page listen: a strports "
            "description such as tcp:9999, tcp:9999:interface=127.0.0.1, "
            "ssl:9443:privateKey=key.pem:certKey=cert.pem or unix:/run/chat.sock.",
        ],
        [
            "image-port",
            None,
            "tcp:9998",
            "Where the raw-TCP image protocol listens (4-byte big-endian "
            "length, then an image), or 'none'.",
        ],
        [
            "line-port",
            None,
            "tcp:9997",
            "Where the line bridge (one UTF-8 message per line, for nc and "
            "scripts) listens, or 'none'.",
        ],
        [
            "max-message-size",
            None,
            64 * 1024,
            "Largest WebSocket message (and frame) accepted, in bytes; larger "
            "ones close the connection with code 1009.",
            positive_int,
        ],
        [
            "open-handshake-timeout",
            None,
            10.0,
            "Seconds a client may take from connecting to the end of its HTTP "
            "request (its WebSocket handshake, or any other request; one "
            "deadline for the whole request, not an idle timer), and then to "
            "complete the WebSocket handshake (sign-in included).",
            positive_float,
        ],
        [
            "max-buffer",
            None,
            16 * 1024 * 1024,
            "Bytes that may wait for a client that reads slowly, whatever "
            "produced them (messages, replies, images); a write that would "
            "pass it closes the client as a slow consumer (code 4008).  At "
            "least --max-message-size and --max-image-size.",
            positive_int,
        ],
        [
            "rate",
            None,
            100.0,
            "Messages per second a client may send on average; excess "
            "messages are dropped, and a client that keeps flooding is closed "
            "(1008).  0 means no limit.",
            non_negative_float,
        ],
        [
            "burst",
            None,
            500,
            "Messages a client may send at once above --rate.",
            positive_int,
        ],
        [
            "listen-backlog",
            None,
            1024,
            "Connections the kernel may hold waiting to be accepted, for every "
            "tcp:, ssl: and unix: listener whose description sets no backlog= "
            "of its own.  Twisted's default of 50 makes clients retry (seconds "
            "late) when many reconnect at once, after a restart; the kernel caps "
            "it at net.core.somaxconn.",
            positive_int,
        ],
        [
            "max-connections",
            None,
            50000,
            "Connections at once on every port (WebSocket, HTTP requests, line "
            "bridge, image port), counted from accept; more are refused (HTTP "
            "503, or an error line or frame).  0 means no limit.",
            non_negative_int,
        ],
        [
            "max-connections-per-ip",
            None,
            0,
            "Connections at once from one IP address, on every port, counted "
            "like --max-connections.  0 (the default) means no limit: behind a "
            "reverse proxy every client has the proxy's address.",
            non_negative_int,
        ],
        [
            "ping-interval",
            None,
            25.0,
            "Seconds between keepalive pings to each WebSocket client "
            "(also keeps idle connections open through load balancers).  0 "
            "turns pings off.",
            non_negative_float,
        ],
        [
            "ping-timeout",
            None,
            10.0,
            "Seconds a client has to answer a ping before it is dropped as dead.",
            positive_float,
        ],
        [
            "max-image-size",
            None,
            16 * 1024 * 1024,
            "Largest image frame accepted on the image port, in bytes; a "
            "larger declared length is refused before anything is buffered.",
            positive_int,
        ],
        [
            "image-timeout",
            None,
            30.0,
            "Seconds an image frame may take from its first byte to its last.",
            positive_float,
        ],
        [
            "raw-idle-timeout",
            None,
            900.0,
            "Seconds a line-bridge or image-port client may send nothing before "
            "it is told so and disconnected (raw TCP has no keepalive ping).  0 "
            "means no limit.",
            non_negative_float,
        ],
        [
            "image-max-pixels",
            None,
            DEFAULT_MAX_PIXELS,
            "Largest image accepted, in pixels (width x height), checked "
            "before decoding: a guard against decompression bombs.",
            positive_int,
        ],
        [
            "image-threads",
            None,
            2,
            "Threads that decode images (at most this many at once).",
            positive_int,
        ],
        [
            "image-formats",
            None,
            ",".join(name.lower() for name in DEFAULT_FORMATS),
            "Image formats accepted on the image port and for image_url, "
            "comma-separated, of: {}.  Anything else is refused as an "
            "unsupported image format.".format(
                ", ".join(name.lower() for name in KNOWN_FORMATS)
            ),
            image_formats,
        ],
        [
            "max-pending-images",
            None,
            16,
            "Images that may wait to be decoded or be decoded at once, "
            "server-wide; more are refused with 'busy; retry later'.",
            positive_int,
        ],
        [
            "image-decode-memory",
            None,
            1024 * 1024 * 1024,
            "Bytes of decoded pixels the images being decoded may hold between "
            "them (12 bytes a pixel at most); an image that does not fit now "
            "is refused with 'busy; retry later'.  At least --image-max-pixels "
            "x 12.",
            positive_int,
        ],
        [
            "max-line-length",
            None,
            64 * 1024,
            "Longest line accepted on the line bridge, in bytes.",
            positive_int,
        ],
        [
            "metrics-port",
            None,
            None,
            "Serve /metrics on this endpoint of its own (e.g. "
            "tcp:9100:interface=127.0.0.1) instead of on --port.",
        ],
        [
            "log-format",
            None,
            "text",
            "text (twistd's usual lines) or json (one JSON object per event "
            "and line, for log shippers; written to --logfile or standard output).",
        ],
        [
            "batch-delay",
            None,
            None,
            "Seconds the fan-out waits to send events together (default: 0, "
            "the end of the current reactor turn; 0.003 with --redis when "
            "hiredis is not installed, as events then arrive one by one).  "
            "More throughput under bursts, that much more latency.",
            non_negative_float,
        ],
        [
            "history-size",
            None,
            100,
            "Text messages each room remembers, for history requests and "
            "recovery after a reconnect; 0 keeps none.",
            non_negative_int,
        ],
        [
            "history-memory",
            None,
            DEFAULT_MEMORY,
            "Bytes the histories of all rooms may keep together (each message "
            "counts its text as held in memory, 1 to 4 bytes a character, plus "
            "{} bytes); past it the rooms that keep the most forget their "
            "oldest messages, and recoveries that needed them are incomplete. "
            "With --redis it bounds the history kept locally while Redis is "
            "unreachable.  At least --max-message-size.".format(KEPT_OVERHEAD),
            byte_count,
        ],
        [
            "max-rooms",
            None,
            10000,
            "Rooms whose history is remembered; beyond this the least recently "
            "used empty rooms are forgotten.",
            positive_int,
        ],
        [
            "max-rooms-per-client",
            None,
            100,
            "Rooms one client may be in at once.",
            positive_int,
        ],
        [
            "max-name-length",
            None,
            32,
            "Longest display name, in characters.",
            positive_int,
        ],
        [
            "drain-timeout",
            None,
            10.0,
            "On shutdown, seconds to wait for clients to close before dropping them.",
            positive_float,
        ],
        [
            "node-id",
            None,
            None,
            "Prefix of the client ids this server hands out (default: random). "
            "Must differ between servers sharing a backplane.",
        ],
        [
            "redis-password-file",
            None,
            None,
            "With --redis: a file holding the Redis password (read at start-up; "
            "the line breaks at its end are dropped).  Not with a password in the "
            "--redis URL.  Without either, the environment variable {} is used "
            "if set.".format(secrets.REDIS_PASSWORD),
        ],
        [
            "redis-namespace",
            None,
            "default",
            "Prefix of the Redis keys and channel, to keep apart deployments "
            "that share one Redis.",
        ],
        [
            "node-timeout",
            None,
            15.0,
            "With --redis: seconds after which a server that stopped "
            "heartbeating is declared dead and its clients announced as gone.",
            positive_float,
        ],
        [
            "anonymous-rooms",
            None,
            None,
            "Rooms that clients who do not sign in may use (with every right), "
            "comma-separated; a name may end in * (public-*).  Default: every "
            "room when nobody signs in; with --auth-url or --jwt-*, the lobby "
            "for --anonymous-raw-ports clients and nothing otherwise.",
        ],
        [
            "room-grace",
            None,
            10.0,
            "With --redis: seconds a server keeps receiving a room after its "
            "last client there left (a client coming back meanwhile needs no "
            "new subscription).",
            non_negative_float,
        ],
        [
            "room-ttl",
            None,
            7 * 24 * 3600.0,
            "With --redis: seconds a room's keys (sequence, epoch, history) "
            "are kept after its last join, recovery or message; 0 keeps them "
            "for ever.",
            non_negative_float,
        ],
        [
            "webhook-secret",
            None,
            None,
            "Sign webhook POSTs: X-Broadcaster-Signature: sha256=<HMAC-SHA256 "
            "of the body with this secret>.  Every local user can read it on "
            "the command line: prefer --webhook-secret-file.",
        ],
        [
            "webhook-secret-file",
            None,
            None,
            "Sign webhook POSTs with the secret this file holds (read at "
            "start-up; the line breaks at its end are dropped).  Not with "
            "--webhook-secret.",
        ],
        [
            "webhook-timeout",
            None,
            10.0,
            "Seconds a webhook receiver has to answer one POST.",
            positive_float,
        ],
        [
            "webhook-retry-for",
            None,
            300.0,
            "Seconds a failed webhook batch is retried (with backoff) before "
            "it is dropped; 0: never retried.",
            non_negative_float,
        ],
        [
            "webhook-queue",
            None,
            10000,
            "Events each webhook URL may have waiting; beyond it the oldest are dropped.",
            positive_int,
        ],
        [
            "webhook-queue-bytes",
            None,
            DEFAULT_QUEUE_BYTES,
            "Bytes (of JSON) the events waiting for each webhook URL may take; "
            "beyond it the oldest are dropped, as beyond --webhook-queue.  At "
            "least --max-message-size.",
            byte_count,
        ],
        [
            "auth-url",
            None,
            None,
            "Ask this HTTP(S) service about every WebSocket handshake (a JSON "
            "POST with the client's Authorization and Cookie headers): 2xx "
            "admits, 401/403 refuses (403), no usable answer refuses (503).",
        ],
        [
            "auth-timeout",
            None,
            5.0,
            "Seconds the --auth-url service has to answer.",
            positive_float,
        ],
        [
            "jwt-secret-file",
            None,
            None,
            "Admit WebSocket clients whose token (Authorization: Bearer or "
            "?token=) is an HS256 JWT signed with the secret this file holds "
            "(read at start-up; the line breaks at its end are dropped; at "
            "least 32 bytes).  See docs/auth.rst.",
        ],
        [
            "jwt-public-key",
            None,
            None,
            "Admit WebSocket clients whose token is a JWT signed with the "
            "private half of this PEM public key: RS256 (RSA, 2048 bits or "
            "more) or ES256 (P-256).",
        ],
        [
            "jwt-jwks-url",
            None,
            None,
            "Admit WebSocket clients whose token is an RS256 or ES256 JWT "
            "signed with a key of the JWK set at this http(s) URL (fetched at "
            "start-up, every --jwt-jwks-refresh seconds, and for an unknown "
            "kid at most once every --jwt-jwks-min-interval seconds).",
        ],
        [
            "jwt-audience",
            None,
            None,
            "Require this aud claim in tokens (default: aud is not checked).",
        ],
        [
            "jwt-issuer",
            None,
            None,
            "Require this iss claim in tokens (default: iss is not checked).",
        ],
        [
            "jwt-leeway",
            None,
            30.0,
            "Seconds of slack when checking a token's exp, nbf and iat, for "
            "clocks that disagree; a connection signed in with a token is "
            "closed this long after its exp (unless it refreshes it).",
            non_negative_float,
        ],
        [
            "token-refresh-window",
            None,
            60.0,
            "Seconds before a token's exp a JSON client signed in with it is "
            "sent an expiring event (at once if less is left), so that it can "
            "send a refresh with a newer token; without one the connection is "
            "closed with 4001 at exp plus --jwt-leeway.",
            non_negative_float,
        ],
        [
            "jwt-jwks-timeout",
            None,
            5.0,
            "Seconds one fetch of --jwt-jwks-url may take.",
            positive_float,
        ],
        [
            "jwt-jwks-refresh",
            None,
            3600.0,
            "Seconds between fetches of --jwt-jwks-url while all is well, so "
            "that a key removed from the set stops being accepted.",
            positive_float,
        ],
        [
            "jwt-jwks-min-interval",
            None,
            30.0,
            "Fewest seconds between two fetches of --jwt-jwks-url for tokens "
            "whose kid is not in the set: tokens with made-up kids cannot make "
            "the server hammer the URL.",
            positive_float,
        ],
        [
            "api-key-file",
            None,
            None,
            "A file of keys for the server API (/api/...), one per line (read at "
            "start-up; blank lines and # comments skipped).",
        ],
        [
            "fetch-timeout",
            None,
            10.0,
            "Seconds an image_url download may take, redirects included.",
            positive_float,
        ],
        [
            "workers",
            None,
            1,
            "Run this many worker processes sharing the listening ports, "
            "joined through --redis or, without it, a private redis-server "
            "that the master process starts (see docs/workers.rst).  1: one process.",
            positive_int,
        ],
        [
            "worker-fds",
            None,
            None,
            "Internal to --workers: adopt these inherited listening sockets "
            "(port=3,image=4,...) instead of listening.",
        ],
    ]

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        """
        :param environ: the environment to read secrets from (default:
            this process's).
        """
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self["allow-origin"] = []
        self["allow-host"] = []
        self["webhook"] = []
        self["redis"] = None
        self["redis-urls"] = []
        self["api-key"] = []

    def parseOptions(self, options=None) -> None:
        if options is None:
            options = sys.argv[1:]
        # Kept for --workers, which gives each worker the same options
        # (without the secrets): (long name, value) in order, as getopt
        # reads them, so that abbreviations (--api-key-f) and -p count.
        try:
            pairs, _ = getopt.getopt(options, self.shortOpt, self.longOpt)
        except getopt.error:
            pairs = []  # refused below, as usual
        self["given"] = [
            (self.synonyms.get(opt.lstrip("-"), opt.lstrip("-")), value) for opt, value in pairs
        ]
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if not str(e).startswith("Parameter type enforcement failed"):
                raise
            raise self._refused_value(e) from None

    def _refused_value(self, error: usage.UsageError) -> usage.UsageError:
        """
        ``error`` with the flag whose value its coercion refused: Twisted
        says only "Parameter type enforcement failed: must be a positive
        integer", whichever of thirty flags it was.
        """
        coercions = {name: row[3] for name, *row in self.optParameters if len(row) > 3}
        for name, value in self["given"]:
            coerce = coercions.get(name)
            if coerce is None:
                continue
            try:
                coerce(value)
            except ValueError as e:
                return usage.UsageError("--{} {!r}: {}".format(name, value, e))
        return error

    def opt_webhook(self, url: str) -> None:
        """POST every chat event, in batches, to this http(s) URL (repeatable). See docs/webhooks.rst for the format and signature."""  # noqa: E501
        problem = url_problem(url, allow_credentials=True)
        if problem is not None:
            raise usage.UsageError("--webhook {!r}: {}".format(url, problem))
        self["webhook"].append(url)

    def opt_redis(self, url: str) -> None:
        """Share rooms, sequences, histories and presence with every other server using this Redis: redis://[[user]:password@]host[:port][/db], unix:/path/to/redis.sock[?db=N], or through Sentinel redis+sentinel://host:port[,host:port...]/<master>[/db], or a cluster redis+cluster://host:port[,host:port...].  Repeatable (not with a cluster): rooms are spread over the servers by consistent hashing of their names, and every server must give the same list.  Without it the server is on its own.  Better without the password, which every local user can read on a command line: see --redis-password-file."""  # noqa: E501
        self["redis-urls"].append(url)
        self["redis"] = self["redis-urls"][0]

    def opt_api_key(self, key: str) -> None:
        """Accept this key for the server API, /api/... (Authorization: Bearer KEY; repeatable). Without any key the API is off. Every local user can read it on the command line: prefer --api-key-file."""  # noqa: E501
        if not key.strip() or key != key.strip():
            raise usage.UsageError("--api-key must be non-empty, without surrounding spaces")
        self["api-key"].append(key)

    def opt_allow_origin(self, origin: str) -> None:
        """Also accept browser handshakes from this Origin, e.g. https://chat.example.com (repeatable; '*' accepts every origin). By default only the server's own origin is accepted; clients that send no Origin (scripts) are always accepted."""  # noqa: E501
        if origin != "*" and parse_origin(origin) is None:
            raise usage.UsageError(
                "--allow-origin {!r} is not an origin: use scheme://host[:port], "
                "e.g. https://chat.example.com, or '*'".format(origin)
            )
        self["allow-origin"].append(origin)

    def opt_allow_host(self, name: str) -> None:
        """Answer HTTP and WebSocket requests for this host name or address, e.g. chat.example.com (repeatable; any port; others get 403). Default: on a loopback --port, only localhost, *.localhost and loopback addresses; otherwise any name (set this in production, against DNS rebinding). On loopback, the loopback names stay allowed."""  # noqa: E501
        if allowed_host_name(name) is None:
            raise usage.UsageError(
                "--allow-host {!r} is not a host name or address: give one such as "
                "chat.example.com, 10.0.0.5 or [2001:db8::1], without scheme, port "
                "or path".format(name)
            )
        self["allow-host"].append(name)

    def _anonymous_grants(self, signing_in: bool):
        """
        What clients that do not sign in may do: --anonymous-rooms if given;
        without it, everything when nobody signs in, the lobby for the raw
        ports that --anonymous-raw-ports keeps open (as before rooms had
        rights), and nothing otherwise.
        """
        value = self["anonymous-rooms"]
        if value is None:
            if not signing_in:
                return EVERYTHING
            return parse_grants(["lobby"] if self["anonymous-raw-ports"] else [])
        patterns = [part.strip() for part in value.split(",") if part.strip()]
        try:
            return parse_grants(patterns)
        except ValueError as e:
            raise usage.UsageError("--anonymous-rooms {!r}: {}".format(value, e)) from None

    def postOptions(self) -> None:
        if isinstance(self["image-formats"], str):  # the default, uncoerced
            self["image-formats"] = image_formats(self["image-formats"])
        for _, flag in LISTENER_FLAGS:
            if self[flag] is None:
                continue
            if flag in ("image-port", "line-port") and self[flag].lower() == "none":
                self[flag] = None
                continue
            check_endpoint(flag, self[flag])
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(
                "--log-format must be text or json, not {!r}".format(self["log-format"])
            )
        # twistd creates its log observer from its own --logger option after
        # parsing ours; point it at ours, which escapes and redacts, unless
        # the operator chose syslog or an observer of their own.
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger") and not parent.get("syslog"):
            # As twistd does: standard output in the foreground,
            # twistd.log for a daemon, unless --logfile says otherwise.
            default = "-" if parent.get("nodaemon") else "twistd.log"
            logs.use_target(parent.get("logfile") or default)
            parent["logger"] = "broadcaster.service.logs.{}_observer".format(self["log-format"])
        if self["max-buffer"] < self["max-message-size"]:
            raise usage.UsageError(
                "--max-buffer {} is smaller than --max-message-size {}: a client "
                "could not be sent one message of the largest allowed size".format(
                    self["max-buffer"], self["max-message-size"]
                )
            )
        for flag in ("history-memory", "webhook-queue-bytes"):
            if self[flag] < self["max-message-size"]:
                raise usage.UsageError(
                    "--{} {} is smaller than --max-message-size {}: one message of the"
                    " largest allowed size would not fit (--{} is in bytes)".format(
                        flag, self[flag], self["max-message-size"], flag
                    )
                )
        if self["image-decode-memory"] < self["image-max-pixels"] * MAX_BYTES_PER_PIXEL:
            raise usage.UsageError(
                "--image-decode-memory {} is smaller than --image-max-pixels {} x {}"
                " bytes a pixel: the largest image allowed could never be decoded".format(
                    self["image-decode-memory"], self["image-max-pixels"], MAX_BYTES_PER_PIXEL
                )
            )
        if self["max-buffer"] < self["max-image-size"]:
            raise usage.UsageError(
                "--max-buffer {} is smaller than --max-image-size {}: a client "
                "that keeps up could be cut as a slow consumer by the next message "
                "after one image of the largest allowed size".format(
                    self["max-buffer"], self["max-image-size"]
                )
            )
        node = self["node-id"]
        if node is not None and self["worker-fds"] is not None:
            # A worker of --workers: <the master's node id>-w<i>[.<restarts>].
            base, w, number = node.rpartition("-w")
            if w and number.replace(".", "", 1).isdigit():
                node = base
        if node is not None and (not node or not all(c.isalnum() or c in "_." for c in node)):
            raise usage.UsageError(
                "--node-id {!r} must be letters, digits, '_' or '.'".format(node)
            )
        self._check_redis()
        namespace = self["redis-namespace"]
        if not namespace or any(c.isspace() for c in namespace):
            raise usage.UsageError(
                "--redis-namespace {!r} must be non-empty, without spaces".format(namespace)
            )
        self._check_http_options()
        self._check_jwt_options()
        #: The raw ports that sign-in closed (their clients cannot sign in).
        self["closed-for-auth"] = []
        signing_in = (
            self["auth-url"] is not None or self["jwt-keys"] or self["jwt-jwks-url"] is not None
        )
        if signing_in and not self["anonymous-raw-ports"]:
            for flag in ("image-port", "line-port"):
                if self[flag] is not None:
                    self["closed-for-auth"].append(flag)
                    self[flag] = None
        self["anonymous-grants"] = self._anonymous_grants(signing_in)
        self._check_workers()
        self._keep_secrets_off_command_lines()
        # Last, so that every error above quotes the description as given.
        for _, flag in LISTENER_FLAGS:
            if self[flag] is not None:
                self[flag] = with_backlog(self[flag], self["listen-backlog"])

    def _check_redis(self) -> None:
        """
        Parse --redis into ``redis-address``, with the password from the
        URL, --redis-password-file or the environment (see
        :mod:`broadcaster.service.secrets`).
        """
        #: Whether the --redis URL holds a password (a warning at start-up).
        self["redis-url-password"] = False
        from_file = None
        if self["redis-password-file"] is not None:
            if self["redis"] is None:
                raise usage.UsageError("--redis-password-file needs --redis")
            from_file = secrets.read_secret_file("redis-password-file", self["redis-password-file"])
        if self["redis"] is None:
            return
        addresses = []
        for url in self["redis-urls"]:
            try:
                address = parse_redis_url(url)
            except ValueError as e:
                raise usage.UsageError("--redis {!r}: {}".format(redact_url(url), e))
            if address.cluster and len(self["redis-urls"]) > 1:
                raise usage.UsageError(
                    "--redis {!r}: a cluster spreads rooms over its own masters; give it"
                    " as the only --redis".format(redact_url(url))
                )
            if address.password is not None:
                self["redis-url-password"] = True
            password = secrets.redis_password(address.password, from_file, self.environ)
            addresses.append(dataclasses.replace(address, password=password))
        names = [address.shard_name() for address in addresses]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise usage.UsageError(
                    "--redis {!r} is given twice (as {}): each server once".format(
                        redact_url(self["redis-urls"][i]), name
                    )
                )
        if self["workers"] > 1 or self["worker-fds"] is not None:
            if len({address.password for address in addresses}) > 1:
                raise usage.UsageError(
                    "with --workers, every --redis server must take the same password"
                    " (give it in --redis-password-file): the workers are given one"
                )
        self["redis-addresses"] = addresses
        self["redis-address"] = addresses[0]

    def _check_http_options(self) -> None:
        """
        Validate --auth-url, --webhook-secret(-file) and --api-key-file,
        and read the files (at start-up: they may not be readable after
        twistd drops privileges).  A worker takes both from its environment.
        """
        if self["auth-url"] is not None:
            problem = url_problem(self["auth-url"], allow_credentials=True)
            if problem is not None:
                raise usage.UsageError("--auth-url {!r}: {}".format(self["auth-url"], problem))
            if self["auth-timeout"] >= self["open-handshake-timeout"]:
                raise usage.UsageError(
                    "--auth-timeout {:g} must be shorter than --open-handshake-timeout {:g}:"
                    " the handshake would time out first".format(
                        self["auth-timeout"], self["open-handshake-timeout"]
                    )
                )
        if self["webhook-secret"] is not None and not self["webhook-secret"]:
            raise usage.UsageError("--webhook-secret must not be empty")
        if self["webhook-secret-file"] is not None:
            if self["webhook-secret"] is not None:
                raise usage.UsageError(
                    "--webhook-secret and --webhook-secret-file both give the webhook"
                    " secret: give only one (better the file: command lines are visible"
                    " to every local user)"
                )
            self["webhook-secret"] = secrets.read_secret_file(
                "webhook-secret-file", self["webhook-secret-file"]
            )
        keys = list(self["api-key"])
        if self["api-key-file"] is not None:
            keys.extend(secrets.read_keys("api-key-file", self["api-key-file"]))
        if self["worker-fds"] is not None:
            # A worker of --workers: its master hands it the secrets here.
            if self["webhook-secret"] is None:
                self["webhook-secret"] = self.environ.get(secrets.WORKER_WEBHOOK_SECRET) or None
            keys.extend(secrets.worker_api_keys(self.environ))
        self["api-keys"] = keys

    def _check_jwt_options(self) -> None:
        """
        Validate the --jwt-* options and read the secret and the public key
        into ``jwt-keys`` (at start-up, as the other secrets).  A worker
        takes the secret from its environment and reads the public key
        itself.
        """
        keys = []
        secret = self["jwt-secret-file"]
        if secret is not None:
            secret = secrets.read_secret_file("jwt-secret-file", secret)
        elif self["worker-fds"] is not None:
            secret = self.environ.get(secrets.WORKER_JWT_SECRET) or None
        #: The HS256 secret, for a --workers master to hand its workers.
        self["jwt-secret"] = secret
        if secret is not None:
            try:
                keys.append(tokens.secret_key(secret.encode("utf-8")))
            except ValueError as e:
                raise usage.UsageError("--jwt-secret-file: {}".format(e))
        path = self["jwt-public-key"]
        if path is not None:
            pem = secrets.read_secret_file("jwt-public-key", path)
            try:
                keys.append(tokens.public_key(pem.encode("utf-8")))
            except ValueError as e:
                raise usage.UsageError("--jwt-public-key {!r}: {}".format(path, e))
        self["jwt-keys"] = keys
        url = self["jwt-jwks-url"]
        if url is not None:
            problem = url_problem(url, allow_credentials=True)
            if problem is not None:
                raise usage.UsageError("--jwt-jwks-url {!r}: {}".format(url, problem))
            if self["jwt-jwks-timeout"] >= self["open-handshake-timeout"]:
                raise usage.UsageError(
                    "--jwt-jwks-timeout {:g} must be shorter than --open-handshake-timeout"
                    " {:g}: a handshake waiting for the keys would time out first".format(
                        self["jwt-jwks-timeout"], self["open-handshake-timeout"]
                    )
                )
        if not keys and url is None:
            for flag in ("jwt-audience", "jwt-issuer"):
                if self[flag] is not None:
                    raise usage.UsageError(
                        "--{} needs a key to check tokens with: --jwt-secret-file,"
                        " --jwt-public-key or --jwt-jwks-url".format(flag)
                    )
        for flag in ("jwt-audience", "jwt-issuer"):
            if self[flag] is not None and not self[flag]:
                raise usage.UsageError("--{} must not be empty".format(flag))

    def _keep_secrets_off_command_lines(self) -> None:
        """
        Note the secrets given on the command line (``secrets-on-command-line``,
        warned about at start-up), and what a --workers master gives its
        workers: ``worker-args`` without secrets, ``worker-env`` with them.
        """
        self["secrets-on-command-line"] = secrets.command_line_secrets(
            self["given"], self["redis-url-password"]
        )
        address = self.get("redis-address")
        self["worker-args"] = secrets.worker_args(
            self["given"],
            [name[:-1] for name in self.longOpt if name.endswith("=")],
            [address.without_password() for address in self.get("redis-addresses", ())],
        )
        self["worker-env"] = secrets.worker_environment(
            self["webhook-secret"],
            self["api-keys"],
            address.password if address is not None else None,
            self["jwt-secret"],
        )

    def _check_workers(self) -> None:
        """
        Validate --workers (shareable ports; a Redis to join the workers)
        and the internal --worker-fds.
        """
        self["redis-server"] = None
        if self["worker-fds"] is not None:
            if self["workers"] > 1:
                raise usage.UsageError("--worker-fds is internal to --workers; give only --workers")
            try:
                self["worker-fds"] = parse_worker_fds(self["worker-fds"])
            except ValueError as e:
                raise usage.UsageError("--worker-fds {!r}: {}".format(self["worker-fds"], e))
            return
        if self["workers"] == 1:
            return
        for _, flag in LISTENER_FLAGS:
            if self[flag] is not None:
                problem = sharing_problem(self[flag])
                if problem is not None:
                    raise usage.UsageError("--{} {!r}: {}".format(flag, self[flag], problem))
        if self["redis"] is None:
            self["redis-server"] = find_redis_server()
            if self["redis-server"] is None:
                raise usage.UsageError(NO_REDIS)
