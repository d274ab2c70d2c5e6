"""
The operator dashboard, ``/admin`` on the main port (docs/admin.rst is its
guide): a page the server serves itself, and the two endpoints only it
reads.  Everything else it shows or does goes through the server API
(:mod:`broadcaster.http.api`): a room's members and history, disconnecting
a user or a client, publishing an announcement.

``GET /admin`` (and ``/admin/admin.js``, ``/admin/admin.css``)
    The page, under the chat page's Content-Security-Policy: nothing from
    any other origin, no inline script or style.  It holds no data, so it
    needs no key; it asks for one and keeps it in ``sessionStorage``.

``GET /admin/stream``, with ``Authorization: Bearer <API key>``
    The live figures as Server-Sent Events (the page reads them with
    ``fetch()``, since ``EventSource`` cannot send the key)::

        event: backlog
        data: {"node": "9b1e0c", "interval": 1.0, "samples": [<sample>, ...]}

        event: sample
        data: <sample>

        event: rooms
        data: <rooms>

    ``backlog`` comes first, with the samples of the last 15 minutes;
    then every second a ``sample`` and the ``rooms`` ranked (their shapes
    are in :mod:`broadcaster.core.sampling`).  A reader that falls
    ``--max-buffer`` behind is cut off.

``GET /admin/nodes``, with the key
    ``{"node": <this node>, "backplane": <as /healthz shows it>, "nodes":
    [{"node", "connections", "heartbeat_age", "here", "alive"}, ...]}``:
    every node sharing the backplane
    (:meth:`~broadcaster.core.backplane.Backplane.nodes`).

The endpoints answer as the server API does: 401 without a key or with a
wrong one (and nothing else: no figure, no node name), each request
logged with the key's id.  Without an API key, or with ``--no-admin``,
none of ``/admin`` exists (404).

The figures come from one :class:`~broadcaster.core.sampling.Sampler`,
which :class:`Dashboard` (a timer service) has read the counters once a
second; each second's events are encoded once, for every open stream
(:class:`Feed`).
"""

from __future__ import annotations

from typing import Any, Iterable, List, Set

from twisted.application.internet import TimerService
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from broadcaster.core.hub import Hub
from broadcaster.core.sampling import Sampler
from broadcaster.http.api import KeyedResource, json_answer
from broadcaster.http.site import StaticFile, load_static
from broadcaster.protocols.stream import StreamBody, sse_event

#: Seconds between two samples.
INTERVAL = 1.0


class _Reader:
    """
    One open ``GET /admin/stream``.
    """

    _log = Logger()

    def __init__(self, feed: "Feed", request: Request, peer: str, key: str) -> None:
        self._feed = feed
        self._request = request
        self.peer = peer
        self.key = key
        self.closing = False
        self._body = StreamBody(request)

    def send(self, pieces: List[bytes]) -> None:
        """
        Queue whole events, or cut the reader off if it is too far behind.
        """
        if self.closing:
            return
        if not self._body.write(pieces, self._feed.limit):
            self._log.warn(
                "[SLOW CONSUMER] dashboard reader {peer} (key {key}) is more than"
                " --max-buffer {limit} bytes behind; disconnecting",
                peer=self.peer,
                key=self.key,
                limit=self._feed.limit,
            )
            self.closing = True
            self._request.channel.transport.abortConnection()

    def end(self) -> None:
        """
        End the stream (the server is stopping).
        """
        if not self.closing:
            self.closing = True
            if not self._body.end(self._feed.limit):
                self._request.channel.transport.abortConnection()


class Feed:
    """
    The open dashboard streams, fed by the sampler: it listens only while
    one is open, and each second's events are encoded once for them all.

    :param limit: the bytes that may wait for one reader (``--max-buffer``).
    """

    _log = Logger()

    def __init__(self, sampler: Sampler, node: str, limit: int) -> None:
        self._sampler = sampler
        self._node = node
        self.limit = limit
        self._readers: Set[_Reader] = set()

    def __len__(self) -> int:
        return len(self._readers)

    def open(self, request: Request, peer: str, key: str) -> None:
        """
        Answer ``request`` with the stream: the backlog now, each sample
        from now on, until the reader goes.
        """
        reader = _Reader(self, request, peer, key)
        backlog = {"node": self._node, "interval": INTERVAL, "samples": self._sampler.samples()}
        reader.send([sse_event("backlog", backlog)])
        if not self._readers:
            self._sampler.listen(self._tick)
        self._readers.add(reader)
        self._log.info(
            "[ADMIN] {peer} (key {key}) opened the dashboard; {count} open",
            peer=peer,
            key=key,
            count=len(self._readers),
        )
        request.notifyFinish().addBoth(lambda _: self._gone(reader))

    def _gone(self, reader: _Reader) -> None:
        reader.closing = True
        if reader not in self._readers:
            return
        self._readers.discard(reader)
        if not self._readers:
            self._sampler.stop_listening(self._tick)
        self._log.info(
            "[ADMIN] {peer} (key {key}) closed the dashboard; {count} open",
            peer=reader.peer,
            key=reader.key,
            count=len(self._readers),
        )

    def _tick(self, sample: dict, rooms: dict) -> None:
        pieces = [sse_event("sample", sample) + sse_event("rooms", rooms)]
        for reader in list(self._readers):
            reader.send(pieces)

    def end(self) -> None:
        """
        End every stream (the server is stopping; the page reconnects).
        """
        for reader in list(self._readers):
            reader.end()


class StreamResource(KeyedResource):
    """
    ``GET /admin/stream``: see the module docstring.
    """

    what = "dashboard stream"

    def __init__(self, hub: Hub, keys: Iterable[str], feed: Feed) -> None:
        super().__init__(hub, keys)
        self._feed = feed

    def serve(self, request: Request, peer: str, key: str) -> Any:
        # A stream is idle between events by nature: no request deadline.
        request.channel.streaming()
        self._feed.open(request, peer, key)
        return NOT_DONE_YET


class NodesResource(KeyedResource):
    """
    ``GET /admin/nodes``: see the module docstring.
    """

    what = "dashboard nodes"

    def serve(self, request: Request, peer: str, key: str) -> Any:
        hub = self._hub
        backplane = hub.backplane

        def answer(nodes: List[dict]) -> bytes:
            body = {"node": hub.node_id, "backplane": backplane.state(), "nodes": nodes}
            return json_answer(request, 200, body)

        return self.answer_later(request, peer, backplane.nodes(), answer)


class AdminResource(Resource):
    """
    ``/admin``: the page at ``/admin`` and ``/admin/``, its files and the
    data endpoints beneath.
    """

    def __init__(self, page: StaticFile) -> None:
        super().__init__()
        self._page = page
        self.putChild(b"", page)

    def render_GET(self, request: Request) -> bytes:
        return self._page.render_GET(request)

    render_HEAD = render_GET


class Dashboard(TimerService):
    """
    The dashboard: the sampler, read once a second while the server runs,
    and ``/admin`` (:attr:`resource`).  A child of the listeners' service,
    added before them, so that it stops once they no longer accept: then
    it ends the open streams.

    :param keys: the API keys that open it.
    :param max_buffer: the bytes that may wait for one stream's reader.
    """

    def __init__(self, hub: Hub, keys: Iterable[str], clock, max_buffer: int) -> None:
        self.sampler = Sampler(hub, clock)
        super().__init__(INTERVAL, self.sampler.sample)
        self.clock = clock
        self.feed = Feed(self.sampler, hub.node_id, max_buffer)
        keys = list(keys)
        files = load_static("static/admin")
        self.resource = AdminResource(files.pop(b"index.html"))
        for name, resource in files.items():
            self.resource.putChild(name, resource)
        self.resource.putChild(b"stream", StreamResource(hub, keys, self.feed))
        self.resource.putChild(b"nodes", NodesResource(hub, keys))

    def stopService(self):
        self.feed.end()
        return super().stopService()
