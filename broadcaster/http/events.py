"""
``GET /events``: the event stream's door (the stream itself is
:mod:`broadcaster.protocols.stream`).

It checks what a WebSocket handshake checks, through the same admission
policy (:mod:`broadcaster.protocols.gate`): the request (rooms, and
``Last-Event-ID``: 400), the ``Origin`` and sign-in (403 or 503, as for a
WebSocket), bans (403) and the right to join every room asked for (403:
a stream is all its rooms or nothing).  Tokens come as ``Authorization:
Bearer`` or, from a browser's ``EventSource`` (which cannot set headers),
``?token=``.  Then it answers 200 and hands the connection to an
:class:`~broadcaster.protocols.stream.EventStream` until the client goes.
"""

from __future__ import annotations

from typing import Dict, List

from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from broadcaster.core.names import InvalidName, check_display_name
from broadcaster.core.permissions import JOIN
from broadcaster.core.text import escape_controls
from broadcaster.protocols.gate import Refused, admit_identity, check_origin, sign_in_failed
from broadcaster.protocols.stream import (
    CONTENT_TYPE,
    EventStream,
    StreamRequestError,
    parse_stream_request,
)


def _peer(request: Request) -> str:
    address = request.getClientAddress()
    return "tcp:{}:{}".format(getattr(address, "host", address), getattr(address, "port", ""))


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class EventsResource(Resource):
    """
    ``GET /events?room=...``: see the module docstring.

    :param factory: the WebSocket factory, whose hub, limits, sign-in and
        origin policy the streams share.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, factory) -> None:
        super().__init__()
        self._factory = factory

    def render_HEAD(self, request: Request):
        """
        What a GET would answer, without the stream (a HEAD has no body).
        """
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        request.setHeader(b"Cache-Control", b"no-store")
        return b""

    def render_GET(self, request: Request):
        factory = self._factory
        peer = _peer(request)
        headers: Dict[str, str] = {
            _text(name).lower(): _text(values[-1])
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        try:
            query: Dict[str, List[str]] = {
                name.decode("utf-8"): [value.decode("utf-8") for value in values]
                for name, values in request.args.items()
            }
        except UnicodeDecodeError:
            return self._refuse(
                request, peer, Refused(400, "the query string is not UTF-8"), "request"
            )
        self._log.info(
            "[HANDSHAKE] {peer} GET /events origin={origin} agent={agent!r}",
            peer=peer,
            origin=headers.get("origin", "-"),
            agent=headers.get("user-agent", "-"),
        )
        try:
            rooms, since = parse_stream_request(
                query.get("room", []), headers.get("last-event-id"), factory.hub.max_rooms_per_member
            )
            names = query.get("name")
            name = check_display_name(names[-1], factory.max_name_length) if names else None
        except (StreamRequestError, InvalidName) as e:
            return self._refuse(request, peer, Refused(400, str(e)), "request")
        try:
            check_origin(
                factory.origin_policy,
                factory.hub.stats,
                peer,
                headers.get("origin"),
                headers.get("host"),
                ISSLTransport.providedBy(request.channel.transport),
            )
        except Refused as refused:
            return self._refuse(request, peer, refused)
        # Hold the connection from here on: the request deadline is over,
        # and a stream is idle by nature.
        request.channel.streaming()
        finished = request.notifyFinish()
        gone = []

        def went(result):
            gone.append(True)
            return result

        finished.addBoth(went)
        if factory.authenticator is None:
            self._admitted(request, peer, rooms, since, factory.anonymous, None, name, finished, gone)
            return NOT_DONE_YET
        d = factory.authenticator.authenticate(
            peer=peer, path=_text(request.path), query=query, origin=headers.get("origin"), headers=headers
        )
        # A client gone while its sign-in is checked needs no answer.
        finished.addErrback(lambda failure: d.cancel())

        def signed_in(identity):
            if gone:
                return
            try:
                grants, user = admit_identity(factory.hub, identity, peer)
            except Refused as refused:
                return self._refuse(request, peer, refused)
            self._admitted(
                request, peer, rooms, since, grants, user,
                identity.name if identity.name is not None else name, finished, gone,
                identity.expires if identity.from_token else None,
            )

        def not_signed_in(failure):
            if not gone:
                self._refuse(request, peer, sign_in_failed(factory.hub.stats, failure, peer))

        d.addCallbacks(signed_in, not_signed_in)
        return NOT_DONE_YET

    def _admitted(
        self, request, peer, rooms, since, grants, user, name, finished, gone, expires=None
    ) -> None:
        """
        Signed in (or anonymous): stream, if it may join every room asked for.

        :param gone: not empty once the client has gone.
        """
        factory = self._factory
        for room in rooms:
            if not grants.allows(room, JOIN):
                factory.hub.stats.forbidden += 1
                reason = "not allowed to join room {!r}".format(room)
                self._log.warn(
                    "[FORBIDDEN] {peer}: GET /events{user}: {reason}; answered 403",
                    peer=peer,
                    user="" if user is None else " (user {!r})".format(user),
                    reason=reason,
                )
                self._refuse(request, peer, Refused(403, reason))
                return
        stream = EventStream(factory, request, rooms, since, grants, user, name, peer, expires)
        finished.addBoth(stream.gone)

        def positions(results):
            if gone:
                return
            stream.start({room: position for room, (_, position) in zip(rooms, results)})

        DeferredList(
            [factory.hub.position(room) for room in rooms], fireOnOneErrback=True, consumeErrors=True
        ).addCallbacks(positions, lambda failure: self._unavailable(request, peer, stream, failure, gone))

    def _unavailable(self, request, peer, stream, failure, gone) -> None:
        self._log.failure("{peer}: could not start an event stream", failure, peer=peer)
        if not gone:
            stream.closing = True
            self._refuse(request, peer, Refused(503, "temporarily unavailable, try again"))

    def _refuse(self, request: Request, peer: str, refused: Refused, why: str = ""):
        """
        Answer ``refused`` (its status and reason, as plain text) and end
        the response.
        """
        if why:
            self._log.warn(
                "[REFUSED] {peer}: GET /events: {reason}; answered {status}",
                peer=peer,
                reason=refused.reason,
                status=refused.status,
            )
            self._factory.hub.stats.refused_handshakes[why] += 1
        request.setResponseCode(refused.status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        # The reason may quote what the client sent (its Origin): no raw
        # control characters go back.
        body = (escape_controls(refused.reason) + "\n").encode("utf-8")
        if request.startedWriting:
            return b""
        request.write(body)
        request.finish()
        return NOT_DONE_YET
