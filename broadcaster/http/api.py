"""
The publish API: ``POST /api/publish`` on the main port, for scripts and
other services to say something in the chat.

Wire format::

    POST /api/publish
    Authorization: Bearer <one of the --api-key / --api-key-file keys>
    Content-Type: application/json

    {"text": "Deploy finished", "room": "ops"}

``room`` is optional (default ``lobby``) and need not have anybody in it.
The message is sent from the server itself (``"from": "server"``,
``"name": "server"``), numbered and remembered in the room's history like
any other.  Answers, each with a JSON body:

- 202 ``{"id": "<epoch>:<seq>", "room": ..., "seq": ..., "epoch": ...}``;
- 400 ``{"error": ...}``: not JSON, no ``text`` string, a bad ``room``;
- 401 ``{"error": ...}`` and ``WWW-Authenticate: Bearer``: no key or a wrong one;
- 405: a method other than POST;
- 413: a body larger than ``--max-message-size``.

Without any key configured the API does not exist (404).  Keys are
compared in constant time with every configured key.  They, and the
texts, are never logged.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Dict, Iterable, List, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from broadcaster.core.events import TextMessage
from broadcaster.core.hub import Hub
from broadcaster.core.names import LOBBY, InvalidName, check_room


def read_key_file(path: str) -> List[str]:
    """
    The keys in a ``--api-key-file``: one per line; blank lines and lines
    starting with ``#`` are skipped, surrounding white space removed.

    :raise OSError: if the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def _json(request: Request, code: int, body: Dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


class PublishResource(Resource):
    """
    ``/api/publish``.

    :param keys: the accepted API keys.
    :param max_size: the largest request body accepted, in bytes.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, hub: Hub, keys: Iterable[str], max_size: int) -> None:
        super().__init__()
        self._hub = hub
        self._keys = [key.encode("utf-8") for key in keys]
        self.max_size = max_size

    def _authorized(self, request: Request) -> Optional[str]:
        """
        ``None`` if the request carries one of the keys, else why not.
        """
        header = request.getHeader(b"authorization")
        if header is None:
            return "missing"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "not a Bearer token"
        token = token.strip()
        # Every key compared, each in constant time: the answer's timing
        # tells nothing about which key came close.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return None if matched else "wrong key"

    def render(self, request: Request) -> bytes:
        peer = getattr(request.getClientAddress(), "host", "-")
        if request.method != b"POST":
            request.setHeader(b"Allow", b"POST")
            return _json(request, 405, {"error": "use POST"})
        problem = self._authorized(request)
        if problem is not None:
            self._log.warn(
                "[API] {peer}: publish refused, API key {problem}; answered 401",
                peer=peer,
                problem=problem,
            )
            request.setHeader(
                b"WWW-Authenticate",
                b'Bearer realm="broadcaster"'
                if problem == "missing"
                else b'Bearer realm="broadcaster", error="invalid_token"',
            )
            return _json(
                request, 401, {"error": "an API key is required: Authorization: Bearer <key>"}
            )
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_size:
            return self._too_large(request, peer)
        request.content.seek(0)
        body = request.content.read(self.max_size + 1)
        if len(body) > self.max_size:
            return self._too_large(request, peer)
        try:
            message = json.loads(body)
        except ValueError as e:
            return self._bad(request, peer, "malformed JSON: {}".format(e))
        if not isinstance(message, dict):
            return self._bad(request, peer, "expected a JSON object")
        text = message.get("text")
        if not isinstance(text, str):
            return self._bad(request, peer, 'a "text" string is required')
        room = message.get("room", LOBBY)
        try:
            room = check_room(room)
        except InvalidName as e:
            return self._bad(request, peer, str(e))
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def published(event: TextMessage) -> None:
            self._log.info(
                "[API] {peer} published {size} bytes to {room} (seq {seq})",
                peer=peer,
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
            answer(202, body)

        def failed(failure: Failure) -> None:
            self._log.failure("[API] {peer}: publishing failed", failure, peer=peer)
            answer(503, {"error": "temporarily unavailable, try again"})

        def answer(code: int, body: Dict[str, Any]) -> None:
            if not gone:
                request.write(_json(request, code, body))
                request.finish()

        # The backplane numbers the message; a networked one answers later.
        self._hub.announce(text, room).addCallbacks(published, failed)
        return NOT_DONE_YET

    def _bad(self, request: Request, peer: str, reason: str) -> bytes:
        self._log.warn("[API] {peer}: bad publish request: {reason}", peer=peer, reason=reason)
        return _json(request, 400, {"error": reason})

    def _too_large(self, request: Request, peer: str) -> bytes:
        self._log.warn(
            "[API] {peer}: publish body larger than {limit} bytes; answered 413",
            peer=peer,
            limit=self.max_size,
        )
        return _json(
            request,
            413,
            {
                "error": "the body is larger than {} bytes (--max-message-size)".format(
                    self.max_size
                )
            },
        )


def api_resource(hub: Hub, keys: Iterable[str], max_size: int) -> Resource:
    """
    ``/api``, with ``publish`` under it.
    """
    api = Resource()
    api.putChild(b"publish", PublishResource(hub, keys, max_size))
    return api
