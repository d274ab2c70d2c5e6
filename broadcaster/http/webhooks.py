"""
Webhooks (``--webhook URL``): the chat's events POSTed, in batches, to HTTP
receivers.

Wire format.  ``POST <URL>`` with ``Content-Type: application/json`` and
the body::

    {"events": [<event>, ...], "sent_at": <unix seconds>}

Each event is a JSON object like the JSON protocol's (see
:mod:`broadcaster.protocols.wire`): ``type`` (``join``, ``leave``, ``rename``,
``message``, ``binary``, ``image``), ``room``, ``id`` (joins, leaves,
renames; an image's own id) or ``from`` (messages), ``name``, ``ts``,
``text`` for messages (with ``seq`` and ``epoch``), ``size`` (and width and
height) but never the bytes of binary messages and images, ``user`` when
the client signed in through ``--auth-url``, and ``event_id``: 32 hex
digits, unique per event and the same in every retry and for every URL, so
receivers can drop duplicates.

Headers.  ``X-Broadcaster-Timestamp`` repeats ``sent_at``.  With
``--webhook-secret``, ``X-Broadcaster-Signature: sha256=<hex>`` is the
HMAC-SHA256 of the raw body with the secret.  The timestamp is inside the
signed body, so a receiver that checks ``sent_at`` refuses replays.

Delivery, per URL: events wait in a queue and leave in batches of up to
:data:`BATCH_SIZE` events, or whatever has waited :data:`BATCH_INTERVAL`
seconds.  One batch is in flight at a time, so order is kept.  Delivery is
at least once: a connection error, no answer within ``--webhook-timeout``,
a 5xx, 408 or 429 is retried with exponential backoff and full jitter for
up to ``--webhook-retry-for`` seconds, then the batch is dropped and logged.
Any other answer outside 2xx (4xx, 3xx) is logged as an error and the
batch dropped, not retried: sending it again would get the same answer.
The queue holds ``--webhook-queue`` events and ``--webhook-queue-bytes``
bytes of their JSON (the batch in flight aside); past either the oldest are
dropped (counted, and logged once per episode), as the count bound always
did.  An event larger than the whole byte budget still waits, alone.  Each
retry is signed afresh with a new ``sent_at``.

Little here slows the fan-out: the hub observer turns an event into JSON
once for every URL (its size is what the byte budget counts, and bytes
wait in less memory than a dict) and appends it to a deque; signing and
HTTP happen later, once per batch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random as _random
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from broadcaster.core.fetching import describe_url
from broadcaster.http.outgoing import USER_AGENT, describe_http_failure, read_body, with_timeout
from broadcaster.core.events import Event
from broadcaster.core.hub import Hub
from broadcaster.protocols.wire import event_json

#: Most events in one POST.
BATCH_SIZE = 100

#: Bytes of events one POST carries at most (but always one event): 100
#: large messages, escaped, would otherwise make a POST of tens of MiB,
#: which many receivers refuse outright (413), and a refused batch is
#: dropped.
BATCH_BYTES = 1024 * 1024

#: Seconds an event may wait for others to share its POST.
BATCH_INTERVAL = 1.0

#: Backoff: the first retry waits up to this many seconds...
BASE_DELAY = 1.0

#: ... doubling with each failure up to this.
MAX_DELAY = 60.0

#: Response bodies are read (so connections can be reused) up to this size.
MAX_RESPONSE_BODY = 64 * 1024

SIGNATURE_HEADER = b"X-Broadcaster-Signature"
TIMESTAMP_HEADER = b"X-Broadcaster-Timestamp"

#: Statuses that mean "not now" rather than "never": retried like 5xx.
_RETRY_STATUSES = (408, 429)

#: ``--webhook-queue-bytes``'s default, per URL: 64 MiB.  At ordinary sizes
#: (a join or a short message is 200 to 400 bytes of JSON) --webhook-queue's
#: 10,000 events take 2 to 4 MB, so it binds first; with 64 KiB messages,
#: whose JSON may be six times larger when escaped, 10,000 of them were
#: 640 MiB to 3.75 GiB a URL, and 64 MiB still holds about 1,000 of them:
#: ten batches.
DEFAULT_QUEUE_BYTES = 64 * 1024 * 1024



def sign(body: bytes, secret: bytes) -> bytes:
    """
    The ``X-Broadcaster-Signature`` value for ``body``: ``sha256=<hex HMAC>``.
    """
    return b"sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest().encode("ascii")


def backoff_delay(failures: int, random: Callable[[], float], base: float = BASE_DELAY,
                  cap: float = MAX_DELAY) -> float:
    """
    Seconds to wait before retrying after ``failures`` failed attempts:
    exponential backoff with full jitter, uniformly between 0 and
    ``min(cap, base * 2 ** (failures - 1))``.

    Full jitter spreads the retries of many servers whose receiver came
    back at the same moment.
    """
    return random() * min(cap, base * 2 ** (failures - 1))


def encode(payload: Dict[str, Any]) -> bytes:
    """
    A :func:`webhook_event` as it goes into a POST: compact UTF-8 JSON.
    """
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def webhook_event(event: Event, hub: Optional[Hub] = None) -> Optional[Dict[str, Any]]:
    """
    The webhook form of a hub event, or ``None`` for events webhooks do not carry.

    :param hub: looked up for the member's ``user`` (set by ``--auth-url``).
    """
    payload = event_json(event)
    if payload is None:
        return None
    # Images carry their own "id"; their member is "from".
    member_id = payload["from"] if "from" in payload else payload["id"]
    if hub is not None:
        user = getattr(hub.member(member_id), "user", None)
        if user is not None:
            payload["user"] = user
    payload["event_id"] = uuid.uuid4().hex
    return payload


class WebhookDelivery:
    """
    The queue and delivery loop of one webhook URL.

    :param client: a treq-like client (``post``).
    :param secret: signs each body; ``None``: unsigned.
    :param timeout: seconds one attempt may take, answer included.
    :param retry_for: seconds a batch is retried before it is dropped.
    :param max_queue: events waiting (beyond the batch in flight) before
        the oldest are dropped.
    :param max_queue_bytes: bytes of encoded events waiting (beyond the
        batch in flight) before the oldest are dropped; the newest event
        always waits, were it alone larger.
    :param random: returns a float in [0, 1); jitters the backoff.

    :ivar delivered: events delivered (2xx).
    :ivar retries: attempts that were retried.
    :ivar dropped: events dropped (queue overflow, refused, given up, shutdown).
    :ivar queued_bytes: bytes of the events waiting, the batch in flight aside.
    """

    _log = Logger()

    def __init__(
        self,
        url: str,
        client,
        clock: IReactorTime,
        secret: Optional[bytes] = None,
        timeout: float = 10.0,
        retry_for: float = 300.0,
        max_queue: int = 10000,
        random: Callable[[], float] = _random.random,
        batch_size: int = BATCH_SIZE,
        max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
        batch_interval: float = BATCH_INTERVAL,
    ) -> None:
        self.url = url
        self.target = describe_url(url)
        self._client = client
        self._clock = clock
        self._secret = secret
        self.timeout = timeout
        self.retry_for = retry_for
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self._random = random
        self.batch_size = batch_size
        self.batch_interval = batch_interval

        # (when it was queued, event encoded)
        self._queue: Deque[Tuple[float, bytes]] = deque()
        self.queued_bytes = 0
        # The batch being delivered, and its events as one JSON array for all attempts.
        self._batch: Optional[List[bytes]] = None
        self._batch_json = b""
        self._batch_started = 0.0
        self._failures = 0
        self._attempt: Optional[Deferred] = None
        # The end of the batch window, or the next retry.
        self._timer: Optional[IDelayedCall] = None
        self._overflow = 0

        # Shutting down: send everything now, once, before the deadline.
        self._flushing = False
        self._flushed: Optional[Deferred] = None
        self._deadline: Optional[IDelayedCall] = None

        self.delivered = 0
        self.retries = 0
        self.dropped = 0

    def __len__(self) -> int:
        """Events not yet delivered, the batch in flight included."""
        return len(self._queue) + (len(self._batch) if self._batch is not None else 0)

    @property
    def pending_bytes(self) -> int:
        """Bytes of events not yet delivered, the batch in flight included."""
        return self.queued_bytes + len(self._batch_json)

    def enqueue(self, event: Dict[str, Any], encoded: Optional[bytes] = None) -> None:
        """
        Queue one event (a :func:`webhook_event` dict) for delivery, first
        dropping the oldest waiting if either bound would be passed.

        :param encoded: the event's :func:`encode`, if done already (once
            for every URL).
        """
        if encoded is None:
            encoded = encode(event)
        queue = self._queue
        while queue:
            if len(queue) >= self.max_queue:
                limit, unit, flag = self.max_queue, "events", "--webhook-queue"
            elif self.queued_bytes + len(encoded) > self.max_queue_bytes:
                limit, unit, flag = self.max_queue_bytes, "bytes", "--webhook-queue-bytes"
            else:
                break
            self.queued_bytes -= len(queue.popleft()[1])
            self.dropped += 1
            self._overflow += 1
            if self._overflow == 1:
                self._log.warn(
                    "[WEBHOOK] {target}: queue full ({limit} {unit}, {flag});"
                    " dropping the oldest events until it catches up",
                    target=self.target,
                    limit=limit,
                    unit=unit,
                    flag=flag,
                )
        queue.append((self._clock.seconds(), encoded))
        self.queued_bytes += len(encoded)
        self._pump()

    # The loop: take a batch, attempt it until it is done, repeat.

    def _pump(self) -> None:
        if self._batch is not None:
            return  # one batch at a time; its end pumps again
        if not self._queue:
            if self._flushing:
                self._flush_done()
            return
        if not self._flushing:
            now = self._clock.seconds()
            due = self._queue[0][0] + self.batch_interval
            if len(self._queue) < self.batch_size and now < due:
                if self._timer is None:
                    self._timer = self._clock.callLater(due - now, self._woken)
                return
        self._cancel_timer()
        self._take_batch()
        self._send()

    def _woken(self) -> None:
        self._timer = None
        if self._batch is not None:
            self._send()  # a retry
        else:
            self._pump()  # the batch window closed

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _take_batch(self) -> None:
        batch: List[bytes] = []
        size = 0
        while self._queue and len(batch) < self.batch_size:
            encoded = self._queue[0][1]
            if batch and size + len(encoded) > BATCH_BYTES:
                break
            batch.append(self._queue.popleft()[1])
            size += len(encoded)
        self._batch = batch
        self._batch_json = b"[" + b",".join(self._batch) + b"]"
        self.queued_bytes -= sum(map(len, self._batch))
        self._batch_started = self._clock.seconds()
        self._failures = 0
        if self._overflow:
            self._log.warn(
                "[WEBHOOK] {target}: dropped the {count} oldest events while the queue was full",
                target=self.target,
                count=self._overflow,
            )
            self._overflow = 0

    def _body(self) -> Tuple[bytes, int]:
        sent_at = int(self._clock.seconds())
        body = b'{"events":' + self._batch_json + b',"sent_at":' + str(sent_at).encode() + b"}"
        return body, sent_at

    def _send(self) -> None:
        body, sent_at = self._body()
        headers = {
            b"Content-Type": [b"application/json"],
            b"User-Agent": [USER_AGENT],
            TIMESTAMP_HEADER: [str(sent_at).encode("ascii")],
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = [sign(body, self._secret)]
        d = self._client.post(
            self.url, data=body, headers=headers, allow_redirects=False, unbuffered=True
        )
        d.addCallback(self._read_answer)
        with_timeout(d, self.timeout, self._clock)
        self._attempt = d
        d.addCallbacks(self._answered, self._failed)
        d.addErrback(self._bug)

    def _read_answer(self, response) -> Deferred:
        # Read (and ignore) the body so a kept-alive connection can be reused.
        d = read_body(response, MAX_RESPONSE_BODY)
        d.addErrback(lambda _: None)
        d.addCallback(lambda _: response.code)
        return d

    def _answered(self, code: int) -> None:
        self._attempt = None
        count = len(self._batch or ())
        if 200 <= code < 300:
            self.delivered += count
            self._log.debug(
                "[WEBHOOK] {target}: delivered {count} events", target=self.target, count=count
            )
            self._batch_done()
        elif code >= 500 or code in _RETRY_STATUSES:
            self._retry("HTTP {}".format(code))
        else:
            self._log.error(
                "[WEBHOOK] {target} refused a batch of {count} events with HTTP {status};"
                " not retrying, dropped",
                target=self.target,
                count=count,
                status=code,
            )
            self._drop_batch()

    def _failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._batch is None:
            return  # dropped at the shutdown deadline
        self._retry(describe_http_failure(failure, self.timeout))

    def _bug(self, failure: Failure) -> None:
        self._log.failure("[WEBHOOK] {target}: delivery failed unexpectedly", failure,
                          target=self.target)

    def _retry(self, reason: str) -> None:
        """
        An attempt failed in a way that may pass: try again later, or give up.
        """
        self._failures += 1
        count = len(self._batch or ())
        if self._flushing:
            self._log.error(
                "[WEBHOOK] {target}: last attempt at shutdown failed ({reason});"
                " {count} events dropped",
                target=self.target,
                reason=reason,
                count=count,
            )
            self._drop_batch()
            return
        elapsed = self._clock.seconds() - self._batch_started
        remaining = self.retry_for - elapsed
        if remaining <= 0:
            self._log.error(
                "[WEBHOOK] {target}: gave up on a batch of {count} events after {attempts}"
                " attempts in {elapsed:.0f} s (--webhook-retry-for); last error: {reason};"
                " dropped",
                target=self.target,
                count=count,
                attempts=self._failures,
                elapsed=elapsed,
                reason=reason,
            )
            self._drop_batch()
            return
        delay = min(backoff_delay(self._failures, self._random), remaining)
        self.retries += 1
        self._log.warn(
            "[WEBHOOK] {target}: delivery of {count} events failed ({reason});"
            " retry {attempt} in {delay:.1f} s",
            target=self.target,
            count=count,
            reason=reason,
            attempt=self._failures,
            delay=delay,
        )
        self._timer = self._clock.callLater(delay, self._woken)

    def _drop_batch(self) -> None:
        self.dropped += len(self._batch or ())
        self._batch_done()

    def _batch_done(self) -> None:
        self._batch = None
        self._batch_json = b""
        self._pump()

    # Shutdown

    def flush(self, timeout: float) -> Deferred:
        """
        Send everything queued now, each batch once, and stop.  What is not
        delivered within ``timeout`` seconds is dropped and logged.

        :return: a Deferred that fires when done (never fails).
        """
        if self._flushed is not None:
            return self._flushed
        self._flushing = True
        self._flushed = d = Deferred()
        self._deadline = self._clock.callLater(timeout, self._flush_expired, timeout)
        if self._attempt is None:
            self._cancel_timer()
            if self._batch is not None:
                self._send()  # was waiting to retry: its last attempt
            else:
                self._pump()
        # else: the attempt in flight is the batch's last; its end pumps on.
        return d

    def _flush_done(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._cancel_timer()
        if self._flushed is not None and not self._flushed.called:
            self._flushed.callback(None)

    def _flush_expired(self, timeout: float) -> None:
        self._deadline = None
        lost = len(self)
        self._log.error(
            "[WEBHOOK] {target}: {count} events not delivered within {timeout:g} s"
            " of shutting down; dropped",
            target=self.target,
            count=lost,
            timeout=timeout,
        )
        self.dropped += lost
        self._queue.clear()
        self.queued_bytes = 0
        self._batch = None
        self._batch_json = b""
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()
        self._flush_done()


class WebhookService(Service):
    """
    Sends the hub's events to every ``--webhook`` URL.

    :class:`broadcaster.service.tap.BroadcasterService` stops it only after
    the clients have been closed, so the last batches include their
    ``leave`` events; stopping it flushes what is queued within
    ``flush_timeout`` seconds.

    :param pool: an ``HTTPConnectionPool`` behind ``client``, whose kept-alive
        connections are closed once everything is flushed.
    """

    _log = Logger()

    def __init__(
        self,
        hub: Hub,
        urls: Iterable[str],
        client,
        clock: IReactorTime,
        secret: Optional[bytes] = None,
        timeout: float = 10.0,
        retry_for: float = 300.0,
        max_queue: int = 10000,
        flush_timeout: float = 5.0,
        random: Callable[[], float] = _random.random,
        pool=None,
        max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
    ) -> None:
        self._hub = hub
        self._secret = secret
        self.flush_timeout = flush_timeout
        self._pool = pool
        self.deliveries = [
            WebhookDelivery(
                url,
                client,
                clock,
                secret=secret,
                timeout=timeout,
                retry_for=retry_for,
                max_queue=max_queue,
                max_queue_bytes=max_queue_bytes,
                random=random,
            )
            for url in urls
        ]

    def register_metrics(self, collector) -> None:
        """
        Report the queues on ``/metrics`` (a :class:`~broadcaster.http.metrics.StatsCollector`).
        """
        deliveries = self.deliveries
        collector.add_gauge(
            "broadcaster_webhook_queued_events",
            "Events waiting for webhook delivery (all URLs), the batches in flight included.",
            lambda: sum(len(d) for d in deliveries),
        )
        collector.add_gauge(
            "broadcaster_webhook_queued_bytes",
            "Bytes of JSON of the events waiting for webhook delivery (all URLs),"
            " the batches in flight included.",
            lambda: sum(d.pending_bytes for d in deliveries),
        )
        collector.add_gauge(
            "broadcaster_webhook_delivered_events",
            "Events delivered to webhooks since start (all URLs).",
            lambda: sum(d.delivered for d in deliveries),
        )
        collector.add_gauge(
            "broadcaster_webhook_retries",
            "Webhook POSTs retried since start (all URLs).",
            lambda: sum(d.retries for d in deliveries),
        )
        collector.add_gauge(
            "broadcaster_webhook_dropped_events",
            "Events never delivered to a webhook since start: queue overflow"
            " (--webhook-queue or --webhook-queue-bytes), refused, retries"
            " exhausted or shutdown (all URLs).",
            lambda: sum(d.dropped for d in deliveries),
        )

    def startService(self) -> None:
        super().startService()
        self._hub.add_observer(self._observe)
        for delivery in self.deliveries:
            self._log.info("[WEBHOOK] sending events to {target}", target=delivery.target)
        if self._secret is None:
            self._log.warn(
                "[WEBHOOK] webhooks are unsigned: set --webhook-secret so receivers can"
                " tell they come from this server"
            )

    def _observe(self, event: Event) -> None:
        if event.origin and event.origin != self._hub.node_id:
            # With a Redis backplane every node sees every event; the node
            # where it happened posts it, so receivers get it once.
            return
        payload = webhook_event(event, self._hub)
        if payload is None:
            return
        encoded = encode(payload)
        for delivery in self.deliveries:
            delivery.enqueue(payload, encoded)

    def stopService(self) -> Deferred:
        """
        Stop observing and flush every queue.

        :return: a Deferred that fires once everything is delivered or dropped.
        """
        if not self.running:
            return succeed(None)
        super().stopService()
        # Events the hub still holds for the end of this reactor turn: the
        # clients' departures, just before we are stopped.
        self._hub.flush()
        self._hub.remove_observer(self._observe)
        d = DeferredList([delivery.flush(self.flush_timeout) for delivery in self.deliveries])
        if self._pool is not None:
            d.addCallback(lambda _: self._pool.closeCachedConnections())
        d.addCallback(lambda _: None)
        return d
