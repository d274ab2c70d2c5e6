"""
The server API on the main port, for scripts and other services: say
something in the chat, see who is in a room and what was said there,
and disconnect a user.
docs/server-api.rst is its reference.

Every request carries one of the ``--api-key`` / ``--api-key-file`` keys::

    Authorization: Bearer <key>

Endpoints:

``POST /api/publish``, body ``{"text": "Deploy finished", "room": "ops"}``
    ``room`` is optional (default ``lobby``) and need not have anybody in
    it.  The message is sent from the server itself (``"from": "server"``,
    ``"name": "server"``), numbered and remembered in the room's history
    like any other.  202 ``{"id": "<epoch>:<seq>", "room": ..., "seq": ...,
    "epoch": ...}``; 413 for a body larger than ``--max-message-size``.

``GET /api/rooms/<room>/presence?cursor=<next>&limit=<n>``
    The room's member count and one page of its members on every node, as
    the ``presence`` event lists them: ``{"type": "presence", "room",
    "members": [{"id", "name"}, ...], "count", "next", "cursor"}``.
    ``limit``: at most :data:`~broadcaster.protocols.wire.MEMBERS_PAGE`
    (the default); ``cursor``: the ``next`` of the page before (empty or
    absent: the first page).

``GET /api/rooms/<room>/history?limit=<n>&before=<seq>``
    The room's last messages (those numbered below ``before``, if given),
    as a member's ``history`` request gets them: ``{"type": "history",
    "room", "more", "messages": [...]}``, bounded in bytes as that reply is.
    ``limit``: at most ``--history-size`` (the default).

``POST /api/disconnect``, body ``{"user": "u-1842"}`` or ``{"client": "<id>"}``
    Closes every connection of that signed-in user, or the one client, on
    every node: WebSocket clients with close code 4003 and ``"reason"``
    (optional, at most 123 bytes; default ``disconnected by the
    server``), raw-TCP clients with an error saying it.  ``"ban_seconds"``
    (optional, 0 to 86400, a user only) refuses the user's handshakes on
    every node for that long: 403 "disconnected by the server; try again
    later".  200 ``{"disconnected": <connections closed on this node>}``;
    503 with the same field if the other nodes could not be told.  Each
    is logged as a warning with the key's id and the target.

Asking about a room never makes the server keep anything for it: a room
nobody is in and nothing was said in answers ``count`` 0 and no messages.

Errors are JSON, ``{"error": <why>}``: 400 for a bad body, room name or
query parameter (numbers are ASCII digits, 1 to 2**53; a parameter given
twice is refused); 401 and ``WWW-Authenticate: Bearer`` for no key or a
wrong one; 405 (with ``Allow``) for another method; 503 if the backplane
cannot answer.  Without any key configured the API does not exist (404).
Keys are compared in constant time with every configured key.  They, and
the texts, are never logged; a key is named in the logs by :func:`key_id`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from broadcaster.core.events import TextMessage
from broadcaster.core.hub import Hub
from broadcaster.core.moderation import InvalidExpulsion, parse_expulsion
from broadcaster.http.site import SMALL_BODY
from broadcaster.core.names import LOBBY, InvalidName, check_room
from broadcaster.core.permissions import EVERYTHING, PUBLISH, Grants, parse_grants
from broadcaster.protocols.wire import (
    HISTORY_REPLY_SIZE,
    MAX_REF_LENGTH,
    MEMBERS_PAGE,
    JSONCodec,
    parse_positive_param,
    presence_event,
)


def read_key_file(path: str) -> List[str]:
    """
    The keys in a ``--api-key-file``: one per line; blank lines and lines
    starting with ``#`` are skipped, surrounding white space removed.

    :raise OSError: if the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def key_id(key: str) -> str:
    """
    How the logs name an API key without giving it away: the first 8 hex
    digits of its SHA-256 (``printf %s "$KEY" | sha256sum | cut -c1-8``).
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def json_answer(request: Request, code: int, body: Dict[str, Any]) -> bytes:
    """
    Answer ``code`` with ``body`` as JSON, never cached.
    """
    return _body(request, code, json.dumps(body).encode("utf-8"))


def _body(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _peer(request: Request) -> str:
    return getattr(request.getClientAddress(), "host", "-")


class BadInput(ValueError):
    """
    A request the API cannot accept; ``str()`` is the reason it answers with 400.
    """


class KeyedResource(Resource):
    """
    An endpoint of the server API: one method, the caller's API key
    checked before anything else is read, JSON answers.

    :param keys: the accepted API keys.
    """

    isLeaf = True
    _log = Logger()
    #: The one HTTP method the endpoint answers.
    method = b"GET"
    #: What the logs call a request to it.
    what = "API"

    def __init__(self, hub: Hub, keys: Iterable[str]) -> None:
        super().__init__()
        self._hub = hub
        self._keys = [(key.encode("utf-8"), key_id(key)) for key in keys]

    def _authorized(self, request: Request) -> Tuple[Optional[str], Optional[str]]:
        """
        :return: ``(key id, None)`` if the request carries one of the keys,
            else ``(None, why not)``.
        """
        header = request.getHeader(b"authorization")
        if header is None:
            return None, "missing"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None, "not a Bearer token"
        token = token.strip()
        # Every key compared, each in constant time: the answer's timing
        # tells nothing about which key came close.
        matched = None
        for key, identity in self._keys:
            if hmac.compare_digest(token, key):
                matched = identity
        return (matched, None) if matched is not None else (None, "wrong key")

    def render(self, request: Request) -> bytes:
        peer = _peer(request)
        if request.method != self.method:
            request.setHeader(b"Allow", self.method)
            return json_answer(request, 405, {"error": "use " + self.method.decode("ascii")})
        identity, problem = self._authorized(request)
        if problem is not None:
            self._log.warn(
                "[API] {peer}: {what} refused, API key {problem}; answered 401",
                peer=peer,
                what=self.what,
                problem=problem,
            )
            request.setHeader(
                b"WWW-Authenticate",
                b'Bearer realm="broadcaster"'
                if problem == "missing"
                else b'Bearer realm="broadcaster", error="invalid_token"',
            )
            return json_answer(
                request, 401, {"error": "an API key is required: Authorization: Bearer <key>"}
            )
        try:
            return self.serve(request, peer, identity)
        except BadInput as e:
            self._log.warn(
                "[API] {peer}: bad {what} request: {reason}",
                peer=peer,
                what=self.what,
                reason=str(e),
            )
            return json_answer(request, 400, {"error": str(e)})

    def serve(self, request: Request, peer: str, key: str) -> Any:
        """
        Answer a request that carries an API key, as ``render`` would.

        :param key: the key's id (:func:`key_id`), for the logs.
        :raise BadInput: to answer 400.
        """
        raise NotImplementedError

    def answer_later(
        self, request: Request, peer: str, result: Deferred, answer: Callable[[Any], bytes]
    ) -> Any:
        """
        Answer with ``answer(r)`` once ``result`` fires with ``r`` (a
        networked backplane answers later), or 503 if it fails; not at all
        if the client is gone meanwhile.
        """
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> bytes:
            self._log.failure(
                "[API] {peer}: {what} failed", failure, peer=peer, what=self.what
            )
            return json_answer(request, 503, {"error": "temporarily unavailable, try again"})

        result.addCallbacks(answer, failed).addCallback(write)
        return NOT_DONE_YET


def _json_body(request: Request, limit: int) -> Dict[str, Any]:
    """
    The JSON object a request's body holds.

    :raise BadInput: if it is not one.
    """
    request.content.seek(0)
    try:
        message = json.loads(request.content.read(limit + 1))
    except ValueError as e:
        raise BadInput("malformed JSON: {}".format(e)) from None
    if not isinstance(message, dict):
        raise BadInput("expected a JSON object")
    return message


def _room(value: object) -> str:
    try:
        return check_room(value)
    except InvalidName as e:
        raise BadInput(str(e)) from None


class PublishResource(KeyedResource):
    """
    ``POST /api/publish``.

    :param max_size: the largest request body accepted, in bytes.
    """

    method = b"POST"
    what = "publish"

    def __init__(
        self, hub: Hub, keys: Iterable[str], max_size: int, tokens: Optional[Any] = None
    ) -> None:
        super().__init__(hub, keys)
        self.max_size = max_size
        #: Checks a signed token (``verify``) given instead of a key, or
        #: ``None``: keys only.
        self._tokens = tokens

    def render(self, request: Request) -> bytes:
        """
        As every endpoint, with one more way in: a bearer that is no API
        key but a signed token whose ``rooms`` let its user publish in the
        room (scripts that should not hold a key).
        """
        if self._tokens is None or request.method != self.method:
            return super().render(request)
        _, problem = self._authorized(request)
        if problem != "wrong key":
            return super().render(request)
        peer = _peer(request)
        token = request.getHeader(b"authorization").partition(b" ")[2].strip()
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def signed_in(identity) -> Any:
            try:
                grants = parse_grants(identity.rooms)
                return self.serve(request, peer, "user " + str(identity.user), grants)
            except (BadInput, ValueError) as e:
                return json_answer(request, 400, {"error": str(e)})

        def refused(failure: Failure) -> bytes:
            reason = getattr(failure.value, "reason", None) or "the token was refused"
            self._log.warn(
                "[API] {peer}: publish refused, neither a key nor a good token ({reason});"
                " answered 401",
                peer=peer,
                reason=reason,
            )
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="broadcaster", error="invalid_token"')
            return json_answer(request, 401, {"error": "a key or a signed token is required"})

        def write(body: Any) -> None:
            if body is NOT_DONE_YET or gone:
                return
            request.write(body)
            request.finish()

        d = self._tokens.verify(token.decode("utf-8", "replace"))
        d.addCallbacks(signed_in, refused).addCallback(write)
        return NOT_DONE_YET

    def serve(self, request: Request, peer: str, key: str, grants: Grants = EVERYTHING) -> Any:
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_size:
            return self._too_large(request, peer)
        request.content.seek(0)
        if len(request.content.read(self.max_size + 1)) > self.max_size:
            return self._too_large(request, peer)
        message = _json_body(request, self.max_size)
        text = message.get("text")
        if not isinstance(text, str):
            raise BadInput('a "text" string is required')
        room = _room(message.get("room", LOBBY))
        if not grants.allows(room, PUBLISH):
            self._log.warn(
                "[FORBIDDEN] {peer} ({key}): not allowed to publish in room {room!r}",
                peer=peer,
                key=key,
                room=room,
            )
            return json_answer(
                request, 403, {"error": "not allowed to publish in room {!r}".format(room)}
            )

        def published(event: TextMessage) -> bytes:
            self._log.info(
                "[API] {peer} ({key}) published {size} bytes to {room} (seq {seq})",
                peer=peer,
                key=key,
                size=len(text.encode("utf-8")),
                room=room,
                seq=event.seq,
            )
            body = {
                "id": "{}:{}".format(event.epoch, event.seq),
                "room": room,
                "seq": event.seq,
                "epoch": event.epoch,
            }
            return json_answer(request, 202, body)

        # The backplane numbers the message; a networked one answers later.
        return self.answer_later(request, peer, self._hub.announce(text, room), published)

    def _too_large(self, request: Request, peer: str) -> bytes:
        self._log.warn(
            "[API] {peer}: publish body larger than {limit} bytes; answered 413",
            peer=peer,
            limit=self.max_size,
        )
        return json_answer(
            request,
            413,
            {
                "error": "the body is larger than {} bytes (--max-message-size)".format(
                    self.max_size
                )
            },
        )


def _param(request: Request, name: str) -> Optional[str]:
    """
    The query parameter ``name``, or ``None`` if absent.

    :raise BadInput: if it is given more than once, or is not UTF-8.
    """
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    if len(values) > 1:
        raise BadInput("give {} at most once".format(name))
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("{} is not UTF-8".format(name)) from None


def _positive(request: Request, name: str, default: int) -> int:
    value = _param(request, name)
    if value is None:
        return default
    number = parse_positive_param(value)
    if number is None:
        raise BadInput("{} must be a positive integer (ASCII digits, at most 2**53)".format(name))
    return number


_JSON = JSONCodec()


class RoomsResource(KeyedResource):
    """
    ``GET /api/rooms/<room>/presence`` and ``GET /api/rooms/<room>/history``:
    what a member of the room would see, read without creating anything
    for the room (a room's position is what the backplane keeps once
    asked for, so it is not asked for).

    :param history_reply_size: bytes of messages one history answer
        holds, as a member's history reply (but one message always fits).
    """

    what = "room"

    def __init__(self, hub: Hub, keys: Iterable[str], history_reply_size: int) -> None:
        super().__init__(hub, keys)
        self._history_reply_size = history_reply_size

    def serve(self, request: Request, peer: str, key: str) -> Any:
        path = request.postpath
        if len(path) != 2 or path[1] not in (b"presence", b"history"):
            return json_answer(
                request,
                404,
                {"error": "not found: /api/rooms/<room>/presence or /api/rooms/<room>/history"},
            )
        room = _room(unquote(path[0].decode("latin-1")))
        if path[1] == b"presence":
            return self._presence(request, room)
        return self._history(request, peer, room)

    def _presence(self, request: Request, room: str) -> bytes:
        cursor = _param(request, "cursor") or None
        if cursor is not None and len(cursor) > MAX_REF_LENGTH:
            raise BadInput("cursor must be the next of an earlier page")
        limit = min(_positive(request, "limit", MEMBERS_PAGE), MEMBERS_PAGE)
        members = self._hub.presence(room)
        return json_answer(request, 200, presence_event(room, members, cursor, limit))

    def _history(self, request: Request, peer: str, room: str) -> Any:
        size = self._hub.history_size
        limit = min(_positive(request, "limit", size), size)
        before = _positive(request, "before", 0) or None

        def answer(messages: List[TextMessage]) -> bytes:
            # One more than asked for tells whether older ones are kept.
            more = len(messages) > limit
            kept = messages[-limit:] if limit else []
            return _body(request, 200, _JSON.history(room, kept, more, self._history_reply_size))

        # The backplane, not the hub: the hub answers members only.  With
        # the in-process backplane a room without history stays without;
        # Redis answers an empty list for a key it does not have.
        found = self._hub.backplane.history(room, limit + 1, before)
        return self.answer_later(request, peer, found, answer)


class DisconnectResource(KeyedResource):
    """
    ``POST /api/disconnect``: close a user's connections, or one client's,
    on every node, and keep the user out for a while if asked
    (:mod:`broadcaster.core.moderation`).
    """

    method = b"POST"
    what = "disconnect"
    def serve(self, request: Request, peer: str, key: str) -> Any:
        try:
            expulsion = parse_expulsion(_json_body(request, SMALL_BODY), by=key)
        except InvalidExpulsion as e:
            raise BadInput(str(e)) from None

        def done(result: Tuple[int, bool]) -> bytes:
            count, everywhere = result
            self._log.warn(
                "[DISCONNECT BY SERVER] {peer}, key {key}: {target} ({count} connections"
                " here){banned}{nowhere_else}",
                peer=peer,
                key=key,
                target=expulsion.target(),
                count=count,
                banned=expulsion.ban_text(),
                nowhere_else="" if everywhere else "; the other nodes could not be told",
                reason=expulsion.reason,
            )
            if not everywhere:
                return json_answer(
                    request,
                    503,
                    {
                        "error": "disconnected on this node only: the other nodes could"
                        " not be told; try again",
                        "disconnected": count,
                    },
                )
            return json_answer(request, 200, {"disconnected": count})

        return self.answer_later(request, peer, self._hub.expel(expulsion), done)


def api_resource(
    hub: Hub,
    keys: Iterable[str],
    max_size: int,
    history_reply_size: int = HISTORY_REPLY_SIZE,
    tokens: Optional[Any] = None,
) -> Resource:
    """
    ``/api``, with ``publish``, ``rooms`` and ``disconnect`` under it.

    :param max_size: the largest body ``publish`` accepts (``--max-message-size``).
    :param tokens: checks signed tokens (``verify``), which ``publish``
        also takes, within their ``rooms``; ``None``: keys only.
    """
    keys = list(keys)
    api = Resource()
    api.putChild(b"publish", PublishResource(hub, keys, max_size, tokens))
    api.putChild(b"rooms", RoomsResource(hub, keys, history_reply_size))
    api.putChild(b"disconnect", DisconnectResource(hub, keys))
    return api
