"""
Tests for :mod:`broadcaster.http.webhooks`: batching, signing, retries with
backoff, the bounded queue and the flush at shutdown, against a real HTTP
receiver on loopback and against ``treq.testing.StubTreq``.

Also home of :func:`serve`, the local twisted.web server the auth and
image-fetch tests use too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from typing import Dict, List, Optional

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from broadcaster.core.events import BinaryMessage, ImageMessage, TextMessage
from broadcaster.http.metrics import StatsCollector
from broadcaster.service.tap import Options, makeService
from broadcaster.http import webhooks
from broadcaster.http.webhooks import (
    BATCH_BYTES,
    WebhookDelivery,
    WebhookService,
    backoff_delay,
    encode,
    sign,
    webhook_event,
)
from broadcaster.core.members import MemberBase
from tests.http.test_metrics import scrape
from tests.support import immediate_hub, Inbox, connect_client, start_server, wait_for
from tests.test_rooms import flood, join_chat, of_type, read_until

MiB = 1024 * 1024


# A real HTTP server on loopback, shared with test_auth and test_fetch.


class TrackingSite(Site):
    """
    A Site that remembers its connections, so a test can drop them all and
    leave a clean reactor whatever the client side did.
    """

    noisy = False

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self._connections: List[list] = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        lost: Deferred = Deferred()
        connection = [None, lost]
        make_connection, connection_lost = protocol.makeConnection, protocol.connectionLost

        def made(transport):
            connection[0] = transport
            make_connection(transport)

        def gone(reason):
            connection_lost(reason)
            if not lost.called:
                lost.callback(None)

        protocol.makeConnection, protocol.connectionLost = made, gone
        self._connections.append(connection)
        return protocol

    def log(self, request) -> None:
        pass

    def drop_connections(self) -> Deferred:
        waiting = []
        for transport, lost in self._connections:
            if not lost.called and transport is not None:
                transport.abortConnection()
                waiting.append(lost)
        return DeferredList(waiting)


class LocalServer:
    """
    :ivar url: ``http://127.0.0.1:<port>``.
    """

    def __init__(self, site: TrackingSite, port) -> None:
        self.site = site
        self.port = port
        self.url = "http://127.0.0.1:{}".format(port.getHost().port)

    @inlineCallbacks
    def stop(self):
        yield self.port.stopListening()
        yield self.site.drop_connections()


def serve(testcase, resource) -> LocalServer:
    """
    Serve ``resource`` on a free loopback port until ``testcase`` ends.
    """
    site = TrackingSite(resource)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    server = LocalServer(site, port)
    testcase.addCleanup(server.stop)
    return server


class Received:
    """
    One POST the receiver got.
    """

    def __init__(self, request) -> None:
        self.headers: Dict[bytes, bytes] = {
            name.lower(): values[0] for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.body: bytes = request.content.read()
        self.json = json.loads(self.body)
        self.events = self.json["events"]


class Receiver(Resource):
    """
    A webhook receiver: records every POST, answers with the next of
    :attr:`statuses` (then 200), or holds requests while :attr:`hold` is set.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: List[Received] = []
        self.inbox = Inbox()
        self.statuses: List[int] = []
        self.hold = False
        self.held: List = []

    def render_POST(self, request):
        received = Received(request)
        self.received.append(received)
        self.inbox.put(received)
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.statuses.pop(0) if self.statuses else 200)
        return b"{}"

    def release(self, code: int = 200) -> None:
        held, self.held = self.held, []
        for request in held:
            request.setResponseCode(code)
            request.finish()

    def next(self) -> Deferred:
        """Wait for the next POST."""
        return self.inbox.next()

    def events(self) -> List[dict]:
        return [event for received in self.received for event in received.events]


def real_client(testcase) -> HTTPClient:
    """
    A treq client with kept-alive connections, closed when ``testcase`` ends.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    testcase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


class FakeMember(MemberBase):
    """A hub member that ignores what it is sent."""

    def __init__(self, member_id: str, name: Optional[str] = None, user: Optional[str] = None):
        self.id = member_id
        self.name = name
        if user is not None:
            self.user = user

    def deliver(self, event) -> None:
        pass

    def shut_down(self) -> None:
        pass

    def abort(self) -> None:
        pass


def events_of(count: int, size: int = 0) -> List[dict]:
    """``count`` message events, each with a text of ``size`` characters or more."""
    return [
        {"type": "message", "text": str(i).ljust(size, "x"), "event_id": "e{}".format(i)}
        for i in range(count)
    ]


class RealReceiverTests(TestCase):
    """
    Delivery over real HTTP to a twisted.web receiver; time (batch window,
    backoff, timeouts) from a ``task.Clock``.
    """

    def setUp(self) -> None:
        self.receiver = Receiver()
        self.server = serve(self, self.receiver)
        self.clock = Clock()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def delivery(self, **kwargs) -> WebhookDelivery:
        kwargs.setdefault("random", lambda: 0.5)
        return WebhookDelivery(self.server.url + "/hook", real_client(self), self.clock, **kwargs)

    @inlineCallbacks
    def test_signed_batch_of_hub_events(self):
        """A join and a message within a second arrive in one POST, signed with the secret."""
        hub = immediate_hub(self.clock)
        service = WebhookService(
            hub, [self.server.url + "/hook"], real_client(self), self.clock, secret=b"s3cret"
        )
        service.startService()
        self.addCleanup(service.stopService)
        ann = FakeMember("n-1", "ann", user="ann@example.com")
        hub.connect(ann)
        hub.publish_text("n-1", "hello")
        self.assertEqual(self.receiver.received, [])
        self.clock.advance(1)
        received = yield self.receiver.next()

        expected = "sha256=" + hmac.new(b"s3cret", received.body, hashlib.sha256).hexdigest()
        self.assertTrue(
            hmac.compare_digest(received.headers[b"x-broadcaster-signature"].decode(), expected)
        )
        self.assertEqual(received.headers[b"content-type"], b"application/json")
        self.assertEqual(
            received.headers[b"x-broadcaster-timestamp"], str(received.json["sent_at"]).encode()
        )
        join, message = received.events
        self.assertEqual(
            {k: join[k] for k in ("type", "room", "id", "name", "user", "ts")},
            {"type": "join", "room": "lobby", "id": "n-1", "name": "ann",
             "user": "ann@example.com", "ts": 0.0},
        )
        self.assertEqual(
            {k: message[k] for k in ("type", "room", "from", "name", "text", "seq")},
            {"type": "message", "room": "lobby", "from": "n-1", "name": "ann", "text": "hello",
             "seq": 1},
        )
        self.assertNotEqual(join["event_id"], message["event_id"])
        self.assertRegex(join["event_id"], "^[0-9a-f]{32}$")

    @inlineCallbacks
    def test_every_connection_of_a_user_is_posted(self):
        """Members hear of a user's first connection and its last; webhooks
        get every one, with its id and the user's count of connections."""
        hub = immediate_hub(self.clock)
        service = WebhookService(hub, [self.server.url + "/hook"], real_client(self), self.clock)
        service.startService()
        self.addCleanup(service.stopService)
        tab1 = FakeMember("n-1", "ann", user="u-ann")
        tab2 = FakeMember("n-2", "ann", user="u-ann")
        hub.connect(tab1)
        hub.connect(tab2)
        hub.disconnect(tab1)
        self.clock.advance(1)
        received = yield self.receiver.next()
        self.assertEqual(
            [(e["type"], e["id"], e["user"], e["connections"]) for e in received.events],
            [("join", "n-1", "u-ann", 1), ("join", "n-2", "u-ann", 2), ("leave", "n-1", "u-ann", 1)],
        )

    @inlineCallbacks
    def test_batches_hold_at_most_100_events(self):
        """250 queued events go as 100 and 100 at once, then 50 when the second is up."""
        delivery = self.delivery()
        for event in events_of(250):
            delivery.enqueue(event)
        first = yield self.receiver.next()
        second = yield self.receiver.next()
        yield wait_for(lambda: delivery.delivered == 200, what="two batches delivered")
        self.assertEqual(len(self.receiver.received), 2)
        self.assertEqual(len(delivery), 50)
        self.clock.advance(1)
        third = yield self.receiver.next()
        self.assertEqual(
            [len(first.events), len(second.events), len(third.events)], [100, 100, 50]
        )
        self.assertEqual(
            [e["event_id"] for e in self.receiver.events()],
            ["e{}".format(i) for i in range(250)],
        )

    @inlineCallbacks
    def test_500_is_retried_and_delivered_once(self):
        """After a 500 the same events are sent again after the backoff, and only once accepted."""
        self.receiver.statuses = [500]
        delivery = self.delivery()
        delivery.enqueue(events_of(1)[0])
        self.clock.advance(1)
        first = yield self.receiver.next()
        yield wait_for(lambda: delivery.retries == 1, what="a retry to be scheduled")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.5)  # random() 0.5 of the first backoff step, 1 s
        second = yield self.receiver.next()
        yield wait_for(lambda: delivery.delivered == 1, what="delivery")
        self.assertEqual(first.events, second.events)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((delivery.dropped, len(delivery)), (0, 0))
        self.assertEqual(len(self.receiver.received), 2)

    @inlineCallbacks
    def test_4xx_is_not_retried(self):
        """A 400 drops the batch with an error naming the status; later events still go."""
        self.receiver.statuses = [400]
        delivery = self.delivery()
        delivery.enqueue(events_of(1)[0])
        self.clock.advance(1)
        yield self.receiver.next()
        yield wait_for(lambda: delivery.dropped == 1, what="the batch to be dropped")
        self.assertEqual((delivery.retries, self.clock.getDelayedCalls()), (0, []))
        errors = [e for e in self.logged if e["log_level"] == LogLevel.error]
        self.assertEqual([e.get("status") for e in errors], [400])
        delivery.enqueue({"type": "message", "event_id": "later"})
        self.clock.advance(1)
        later = yield self.receiver.next()
        self.assertEqual(later.events[0]["event_id"], "later")

    @inlineCallbacks
    def overflowed(self, events, **kwargs):
        """
        Deliver ``events[0]`` and have the receiver hold it, queue the
        others meanwhile, then let the receiver answer.

        :return: ``(delivery, ids)``: the delivery, and the ``event_id`` of
            each event in the POST after the one held.
        """
        self.receiver.hold = True
        delivery = self.delivery(**kwargs)
        delivery.enqueue(events[0])
        self.clock.advance(1)
        yield self.receiver.next()
        for event in events[1:]:
            delivery.enqueue(event)
        self.receiver.hold = False
        self.receiver.release()
        yield wait_for(lambda: delivery.delivered == 1, what="the first batch")
        self.clock.advance(1)
        rest = yield self.receiver.next()
        return delivery, [e["event_id"] for e in rest.events]

    def overflow_logged(self):
        """The overflow warnings, and the counts of the summaries after them."""
        return (
            [e for e in self.logged if "queue full" in e.get("log_format", "")],
            [e["count"] for e in self.logged
             if "while the queue was full" in e.get("log_format", "")],
        )

    @inlineCallbacks
    def test_overflow_drops_the_oldest(self):
        """With the queue full, the oldest waiting events are dropped and it is logged once."""
        delivery, ids = yield self.overflowed(events_of(7), max_queue=3)
        self.assertEqual((ids, delivery.dropped), (["e4", "e5", "e6"], 3))
        warnings, summaries = self.overflow_logged()
        self.assertEqual(([e["flag"] for e in warnings], summaries), (["--webhook-queue"], [3]))

    @inlineCallbacks
    def test_overflow_by_bytes_drops_the_oldest(self):
        """Past --webhook-queue-bytes the oldest waiting events are dropped,
        counted, and logged once with the flag; the newest go out."""
        events = events_of(9, size=1000)
        budget = 3 * len(encode(events[1])) + 10
        delivery, ids = yield self.overflowed(events, max_queue_bytes=budget)
        self.assertEqual((ids, delivery.dropped), (["e6", "e7", "e8"], 5))
        (warning,), summaries = self.overflow_logged()
        self.assertEqual(
            (warning["limit"], warning["unit"], warning["flag"], summaries),
            (budget, "bytes", "--webhook-queue-bytes", [5]),
        )


class ShutdownTests(TestCase):
    @inlineCallbacks
    def test_stopping_the_server_flushes_joins_and_leaves(self):
        """Stopping the server closes the clients first, then sends their join and leave at once."""
        receiver = Receiver()
        server = serve(self, receiver)
        service, port = yield start_server(
            self, ["--webhook", server.url + "/hook", "--webhook-secret", "k"]
        )
        client = yield connect_client(self, port)
        announcement = yield client.next_text()
        client_id = announcement.split()[0]
        yield service.stopService()
        clean, code, _ = yield client.closed
        self.assertEqual(code, 1001)
        mine = [(e["type"], e["id"]) for e in receiver.events() if e.get("id") == client_id]
        self.assertEqual(mine, [("join", client_id), ("leave", client_id)])
        for received in receiver.received:
            signature = received.headers[b"x-broadcaster-signature"]
            self.assertEqual(signature, sign(received.body, b"k"))


class FloodTests(TestCase):
    """A client flooding a real server's webhooks while their receiver is stuck."""

    @inlineCallbacks
    def test_big_messages_into_many_rooms(self):
        """
        While the receiver holds a POST, a client sends 12 MB of messages
        into 20 rooms of a server with 1 MiB of --webhook-queue-bytes: the
        oldest events are dropped (counted on /metrics, logged once), what
        waits stays within the budget, and once the receiver answers again
        it gets the latest of the flood and the honest client's message
        sent after it, in order.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        receiver = Receiver()
        receiver.hold = True
        server = serve(self, receiver)
        service, port = yield start_server(
            self, ["--webhook", server.url + "/hook", "--webhook-queue-bytes", str(MiB)]
        )
        (delivery,) = service.webhooks.deliveries
        ann, _ = yield join_chat(self, port, "ann")
        yield receiver.next()  # ann's join, held

        eve, _ = yield join_chat(self, port, "eve")
        rooms = ["flood{}".format(i) for i in range(20)]
        sent, _ = yield flood(eve, rooms, 10, 60000)
        ann.send_json({"type": "message", "text": "after the flood", "ref": 1})
        yield read_until(ann, of_type("ack", ref=1))
        self.assertGreater(delivery.dropped, 180)
        self.assertLessEqual(delivery.queued_bytes, MiB)
        samples = yield scrape(port)
        self.assertEqual(samples[("broadcaster_webhook_dropped_events", ())], delivery.dropped)

        receiver.hold = False
        receiver.release()
        yield wait_for(
            lambda: "after the flood" in [e.get("text") for e in receiver.events()],
            what="the honest message to reach the receiver",
        )
        floods = [e["text"] for e in receiver.events() if e.get("room", "").startswith("flood")
                  and e["type"] == "message"]
        everything = [sent[room][n] for n in range(10) for room in rooms]
        self.assertEqual(floods, everything[len(everything) - len(floods):])
        self.assertEqual(receiver.events()[-1]["text"], "after the flood")
        overflow = [e for e in logged if "queue full" in e.get("log_format", "")]
        self.assertEqual([e["flag"] for e in overflow], ["--webhook-queue-bytes"])


class AlwaysFailing(Resource):
    isLeaf = True

    def __init__(self, code: int = 503) -> None:
        super().__init__()
        self.code = code
        self.count = 0

    def render_POST(self, request):
        self.count += 1
        request.setResponseCode(self.code)
        return b""


class Silent(Resource):
    """Never answers."""

    isLeaf = True

    def render_POST(self, request):
        return NOT_DONE_YET


class BackoffTests(SynchronousTestCase):
    """
    Retry timing with ``StubTreq`` (requests answered synchronously) and a ``task.Clock``.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def delivery(self, resource, **kwargs) -> WebhookDelivery:
        return WebhookDelivery("http://hooks.example/h", StubTreq(resource), self.clock, **kwargs)

    def next_delay(self) -> Optional[float]:
        calls = self.clock.getDelayedCalls()
        if not calls:
            return None
        (call,) = calls
        return call.getTime() - self.clock.seconds()

    def test_a_post_carries_at_most_a_mebibyte_of_events(self):
        """Big events go out in POSTs of at most BATCH_BYTES of events (one
        event alone if it is larger), in order, none lost."""
        receiver = Receiver()
        delivery = self.delivery(receiver)
        big = events_of(30, size=200_000)
        for event in big:
            delivery.enqueue(event)
        self.clock.advance(1)
        while delivery.pending_bytes:
            self.clock.advance(1)
        self.assertEqual(
            [e["event_id"] for r in receiver.received for e in r.events],
            [e["event_id"] for e in big],
        )
        self.assertTrue(all(len(r.body) <= BATCH_BYTES + 400_000 for r in receiver.received))
        self.assertGreater(len(receiver.received), 1)
        self.assertLessEqual(max(len(r.events) for r in receiver.received), 5)

    def test_delays_double_up_to_the_cap_and_give_up_after_retry_for(self):
        """Without jitter delays go 1, 2, 4 ... 60 s, the last cut to end at --webhook-retry-for."""
        failing = AlwaysFailing()
        delivery = self.delivery(failing, retry_for=300, random=lambda: 1.0)
        delivery.enqueue(events_of(1)[0])
        self.clock.advance(1)
        delays = []
        while (delay := self.next_delay()) is not None:
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60, 57])
        self.assertEqual(failing.count, 11)
        self.assertEqual((delivery.retries, delivery.dropped, len(delivery)), (10, 1, 0))
        gave_up = [e for e in self.logged if "gave up" in e.get("log_format", "")]
        self.assertEqual([(e["attempts"], e["reason"]) for e in gave_up], [(11, "HTTP 503")])

    def test_jitter_stays_within_the_exponential_bound(self):
        """Each delay is between 0 and min(60, 2 ** (failures - 1)) with an injected random."""
        delivery = self.delivery(
            AlwaysFailing(), retry_for=10_000, random=random.Random(1234).random
        )
        delivery.enqueue(events_of(1)[0])
        self.clock.advance(1)
        seen = []
        for failures in range(1, 12):
            delay = self.next_delay()
            self.assertTrue(0 <= delay <= min(60, 2 ** (failures - 1)), (failures, delay))
            seen.append(delay)
            self.clock.advance(delay)
        self.assertEqual(len(set(seen)), len(seen), "jitter should vary the delays")

    def test_backoff_delay_scales_the_cap_by_random(self):
        """backoff_delay is random() times the exponential step."""
        self.assertEqual(backoff_delay(1, lambda: 0.0), 0.0)
        self.assertEqual(backoff_delay(3, lambda: 0.5), 2.0)
        self.assertEqual(backoff_delay(20, lambda: 0.5), 30.0)

    def test_timeout_is_retried(self):
        """A receiver that does not answer within the timeout counts as a failure and is retried."""
        delivery = self.delivery(Silent(), timeout=10, random=lambda: 0.5)
        delivery.enqueue(events_of(1)[0])
        self.clock.advance(1)
        self.assertEqual(delivery.retries, 0)
        self.clock.advance(10)
        self.assertEqual(delivery.retries, 1)
        warnings = [e for e in self.logged if e.get("reason") == "no answer within 10 s"]
        self.assertEqual(len(warnings), 1)

    def test_no_retries_with_retry_for_0(self):
        """--webhook-retry-for 0 drops a failed batch at once."""
        delivery = self.delivery(AlwaysFailing(), retry_for=0)
        delivery.enqueue(events_of(1)[0])
        self.clock.advance(1)
        self.assertEqual((delivery.retries, delivery.dropped), (0, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ByteBudgetTests(SynchronousTestCase):
    """
    ``--webhook-queue-bytes`` with a receiver that never answers (the
    first batch stays in flight) and a ``task.Clock``.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def stuck(self, **kwargs) -> WebhookDelivery:
        """A delivery whose first batch is in flight and never answered."""
        delivery = WebhookDelivery(
            "http://hooks.example/h", StubTreq(Silent()), self.clock, timeout=3600, **kwargs
        )
        delivery.enqueue({"type": "message", "event_id": "in flight"})
        self.clock.advance(1)
        self.assertEqual(len(delivery), 1)
        return delivery

    def test_waiting_events_stay_within_the_budget(self):
        """However many big events come, what waits stays within the byte
        budget, the newest events kept, the rest counted as dropped and
        logged once."""
        delivery = self.stuck(max_queue_bytes=100_000)
        for event in events_of(1000, size=3000):
            delivery.enqueue(event)
            self.assertLessEqual(delivery.queued_bytes, 100_000)
        waiting = 100_000 // len(encode(events_of(1, size=3000)[0]))
        self.assertEqual((len(delivery), delivery.dropped), (1 + waiting, 1000 - waiting))
        self.assertEqual(
            delivery.pending_bytes,
            delivery.queued_bytes + len(encode({"type": "message", "event_id": "in flight"})) + 2,
        )
        warnings = [e for e in self.logged if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["flag"] for e in warnings], ["--webhook-queue-bytes"])

    def test_an_event_larger_than_the_budget_waits_alone(self):
        """An event whose JSON alone passes the budget is not lost: it
        waits alone, the others dropped."""
        delivery = self.stuck(max_queue_bytes=5000)
        small, big = events_of(2, size=100)
        big["text"] = "x" * 6000
        delivery.enqueue(small)
        delivery.enqueue(big)
        self.assertEqual((len(delivery), delivery.dropped), (2, 1))
        self.assertEqual(delivery.queued_bytes, len(encode(big)))

    def test_the_count_bound_still_applies(self):
        """With room for the bytes, --webhook-queue still bounds the count,
        and the warning names it."""
        delivery = self.stuck(max_queue=5)
        for event in events_of(8):
            delivery.enqueue(event)
        self.assertEqual((len(delivery), delivery.dropped), (6, 3))
        (warning,) = [e for e in self.logged if e["log_level"] == LogLevel.warn]
        self.assertEqual((warning["flag"], warning["limit"]), ("--webhook-queue", 5))

    def test_each_event_is_encoded_once_for_every_url(self):
        """With several URLs an event's JSON is made once and queued for each."""
        hub = immediate_hub(self.clock)
        service = WebhookService(
            hub, ["http://a.example/", "http://b.example/"], StubTreq(Silent()), self.clock
        )
        service.startService()
        self.addCleanup(setattr, service, "running", 0)
        encoded = []
        self.patch(webhooks, "encode", lambda payload: encoded.append(payload) or b"{}")
        hub.connect(FakeMember("n-1"))
        self.assertEqual(len(encoded), 1)
        self.assertEqual([d.queued_bytes for d in service.deliveries], [2, 2])


class FlushTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = immediate_hub(self.clock)

    def test_stop_sends_at_once(self):
        """Stopping sends what waits without waiting for the batch window."""
        receiver = Receiver()
        service = WebhookService(self.hub, ["http://h.example/"], StubTreq(receiver), self.clock)
        service.startService()
        self.hub.connect(FakeMember("n-1"))
        self.successResultOf(service.stopService())
        self.assertEqual([e["type"] for e in receiver.events()], ["join"])

    def test_stop_gives_up_at_the_deadline(self):
        """A receiver that does not answer delays the stop only until flush_timeout."""
        service = WebhookService(
            self.hub, ["http://h.example/"], StubTreq(Silent()), self.clock, flush_timeout=3
        )
        service.startService()
        self.hub.connect(FakeMember("n-1"))
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(3)
        self.successResultOf(stopped)
        self.assertEqual(service.deliveries[0].dropped, 1)

    def test_retry_waiting_gets_a_last_attempt(self):
        """A batch waiting to be retried is sent once more at stop, without waiting."""
        failing = AlwaysFailing()
        service = WebhookService(
            self.hub, ["http://h.example/"], StubTreq(failing), self.clock, random=lambda: 0.9
        )
        service.startService()
        self.hub.connect(FakeMember("n-1"))
        self.clock.advance(1)
        self.assertEqual(failing.count, 1)
        self.successResultOf(service.stopService())
        self.assertEqual(failing.count, 2)
        self.assertEqual(service.deliveries[0].dropped, 1)

    def test_unsigned_webhooks_are_warned_about(self):
        """Starting without a secret logs a warning that webhooks are unsigned."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = WebhookService(self.hub, ["http://h.example/"], StubTreq(Receiver()), self.clock)
        service.startService()
        self.addCleanup(service.stopService)
        warnings = [e for e in logged if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("unsigned", warnings[0]["log_format"])


class EventFormTests(SynchronousTestCase):
    def test_images_and_binary_carry_sizes_not_bytes(self):
        """Binary and image events give sizes and never the bytes."""
        binary = webhook_event(BinaryMessage(ts=1.0, sender="n-1", data=b"\x00" * 10))
        image = webhook_event(
            ImageMessage(ts=2.0, sender="n-1", image_id="n-img1", png=b"P" * 20, width=4, height=5)
        )
        self.assertEqual(binary["size"], 10)
        self.assertEqual(
            {k: image[k] for k in ("type", "id", "from", "width", "height", "size")},
            {"type": "image", "id": "n-img1", "from": "n-1", "width": 4, "height": 5, "size": 20},
        )
        for event in (binary, image):
            self.assertNotIn(b"\x00" * 10, json.dumps(event).encode())
            self.assertNotIn("P" * 20, json.dumps(event))

    def test_message_event(self):
        """A text message carries its text, sequence and a fresh event id."""
        event = TextMessage(ts=1.23456, room="r", sender="n-1", text="hi", name="ann", seq=4,
                            epoch="ep")
        first, second = webhook_event(event), webhook_event(event)
        self.assertEqual(
            {k: first[k] for k in ("type", "room", "from", "text", "ts", "seq", "epoch")},
            {"type": "message", "room": "r", "from": "n-1", "text": "hi", "ts": 1.235, "seq": 4,
             "epoch": "ep"},
        )
        self.assertNotEqual(first["event_id"], second["event_id"])

    def test_gauges_are_registered(self):
        """The queue length, retries and drops are reported through the metrics collector."""
        clock = Clock()
        hub = immediate_hub(clock)
        service = WebhookService(hub, ["http://h.example/"], StubTreq(Silent()), clock)
        collector = StatsCollector(hub)
        service.register_metrics(collector)
        service.deliveries[0].enqueue(events_of(1)[0])
        values = {family.name: family.samples[0].value for family in collector.collect()
                  if family.name.startswith("broadcaster_webhook")}
        self.assertEqual(
            values,
            {
                "broadcaster_webhook_queued_events": 1,
                "broadcaster_webhook_queued_bytes": len(encode(events_of(1)[0])),
                "broadcaster_webhook_delivered_events": 0,
                "broadcaster_webhook_retries": 0,
                "broadcaster_webhook_dropped_events": 0,
            },
        )


class MakeServiceTests(SynchronousTestCase):
    def test_webhooks_are_a_late_child_with_gauges(self):
        """--webhook adds a webhook service stopped after the drain, reported on /metrics."""
        options = Options()
        options.parseOptions(
            ["--webhook", "https://a.example/h", "--webhook", "https://b.example/h",
             "--webhook-queue", "5", "--webhook-queue-bytes", "100000", "--drain-timeout", "3"]
        )
        service = makeService(options, reactor=MemoryReactorClock())
        webhooks = service.webhooks
        # Just before the clients: stopped right after they have drained.
        self.assertEqual(list(service)[-2:], [webhooks, service.clients])
        self.assertEqual([d.url for d in webhooks.deliveries],
                         ["https://a.example/h", "https://b.example/h"])
        self.assertEqual(
            (webhooks.deliveries[0].max_queue, webhooks.deliveries[0].max_queue_bytes,
             webhooks.flush_timeout),
            (5, 100000, 3),
        )
        names = {family.name for family in service.metrics.collect()}
        self.assertIn("broadcaster_webhook_queued_events", names)

    def test_webhook_urls_are_checked(self):
        """A --webhook that is not an http(s) URL is refused, naming the flag."""
        error = self.assertRaises(
            UsageError, Options().parseOptions, ["--webhook", "mailto:ops@example.com"]
        )
        self.assertIn("--webhook", str(error))


class OriginTests(SynchronousTestCase):
    def test_only_events_from_this_node_are_posted(self):
        """With several nodes, each event is posted by the node it happened on, once."""
        from twisted.internet.task import Clock

        from broadcaster.core.events import TextMessage
        from broadcaster.http.webhooks import WebhookService

        clock = Clock()
        hub = immediate_hub(clock, node_id="here")
        service = WebhookService(hub, ["http://127.0.0.1:1/hook"], client=None, clock=clock)
        service.startService()
        self.addCleanup(setattr, service, "running", 0)
        (delivery,) = service.deliveries
        hub.deliver(TextMessage(1, "lobby", "there-1", "from elsewhere", origin="there"))
        self.assertEqual(len(delivery), 0)
        hub.deliver(TextMessage(1, "lobby", "here-1", "from here", origin="here"))
        self.assertEqual(len(delivery), 1)
