"""
Tests for :mod:`broadcaster.http.metrics` and :mod:`broadcaster.service.logs`: what an
operator's Prometheus and log shipper see.
"""

import io
import json
import sys

import treq
import websocket as websocket_client
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.core.history import KEPT_OVERHEAD
from broadcaster.service import logs
from broadcaster.service.tap import Options
from tests.support import connect_plain_clients, port_of, start_server


@inlineCallbacks
def scrape(port):
    """
    :return: ``{(metric sample name, labels as a sorted tuple): value}``.
    """
    response = yield treq.get("http://127.0.0.1:{}/metrics".format(port), persistent=False)
    body = yield response.text()
    assert response.code == 200, (response.code, body)
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class MetricsTests(TestCase):
    @inlineCallbacks
    def test_counts_follow_what_clients_do(self):
        """Connections, messages, deliveries, bytes, refusals and fan-out time are reported."""
        service, port = yield start_server(self)
        (ann, _), (bob, _) = yield connect_plain_clients(self, port, 2)
        for i in range(3):
            ann.send_text("hello {}".format(i))
        for _ in range(3):
            yield bob.next_text()
            yield ann.next_text()

        def refused():
            try:
                websocket_client.create_connection(
                    "ws://127.0.0.1:{}/".format(port), origin="http://evil.example", timeout=10
                )
            except websocket_client.WebSocketBadStatusException as e:
                return e.status_code

        self.assertEqual((yield deferToThread(refused)), 403)
        samples = yield scrape(port)
        self.assertEqual(samples[("broadcaster_connections", (("kind", "plain"),))], 2)
        self.assertEqual(samples[("broadcaster_connections", (("kind", "json"),))], 0)
        self.assertEqual(samples[("broadcaster_messages_received_total", (("kind", "plain"),))], 3)
        self.assertEqual(
            samples[("broadcaster_received_bytes_total", (("kind", "plain"),))], 3 * len("hello 0")
        )
        # 2 joins seen by 1 and 2 clients, 3 messages to 2 clients each.
        self.assertEqual(samples[("broadcaster_deliveries_total", ())], 1 + 2 + 6)
        self.assertEqual(samples[("broadcaster_frames_sent_total", ())], 9)
        self.assertGreater(samples[("broadcaster_sent_bytes_total", ())], 0)
        self.assertEqual(
            samples[("broadcaster_refused_handshakes_total", (("reason", "origin"),))], 1
        )
        # One observation per batch: the events of one room in one reactor
        # turn (2 joins and 3 messages make 3 to 5 batches).
        batches = samples[("broadcaster_fan_out_seconds_count", ())]
        self.assertTrue(3 <= batches <= 5, batches)
        self.assertEqual(
            samples[("broadcaster_fan_out_seconds_bucket", (("le", "+Inf"),))], batches
        )
        self.assertEqual(samples[("broadcaster_slow_consumer_disconnects_total", ())], 0)
        self.assertEqual(samples[("broadcaster_backplane_connected", (("kind", "local"),))], 1)
        self.assertEqual(samples[("broadcaster_backplane_nodes", ())], 1)
        # The lobby keeps the 3 messages, well within --history-memory.
        self.assertEqual(
            samples[("broadcaster_history_bytes", ())], 3 * (sys.getsizeof("hello 0") + KEPT_OVERHEAD)
        )
        self.assertEqual(samples[("broadcaster_history_evicted_messages_total", ())], 0)

    @inlineCallbacks
    def test_metrics_on_their_own_port(self):
        """--metrics-port serves /metrics there and not on the public port."""
        service, port = yield start_server(
            self, ["--metrics-port", "tcp:0:interface=127.0.0.1"]
        )
        samples = yield scrape(port_of(service.metrics_endpoint))
        self.assertIn(("broadcaster_rooms", ()), samples)
        response = yield treq.get("http://127.0.0.1:{}/metrics".format(port), persistent=False)
        self.assertEqual(response.code, 404)
        yield response.content()

    @inlineCallbacks
    def test_no_metrics(self):
        """--no-metrics removes /metrics."""
        _, port = yield start_server(self, ["--no-metrics"])
        response = yield treq.get("http://127.0.0.1:{}/metrics".format(port), persistent=False)
        self.assertEqual(response.code, 404)
        yield response.content()


class JSONLogTests(SynchronousTestCase):
    def test_log_format_json_installs_the_json_observer(self):
        """--log-format json tells twistd to log through broadcaster.service.logs.json_observer."""
        parent = {"logfile": None, "nodaemon": True, "logger": None}
        options = Options()
        options.parent = parent
        self.addCleanup(logs.use_target, "-")
        options.parseOptions(["--log-format", "json"])
        self.assertEqual(parent["logger"], "broadcaster.service.logs.json_observer")

    def test_bad_log_format(self):
        """Only text and json are log formats."""
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--log-format", "xml"])

    def test_one_json_object_per_line_with_the_event_fields(self):
        """Each event is one JSON line carrying its fields, for log shippers."""
        path = self.mktemp()
        logs.use_target(path)
        self.addCleanup(logs.use_target, "-")
        observer = logs.json_observer()
        publisher = LogPublisher(observer)
        log = Logger(observer=publisher, namespace="broadcaster.test")
        log.info("[CONNECT] {client} connected", client="n-1")
        log.warn("[BAD INPUT] {client}: {reason}", client="n-1", reason="line\nbreak")
        logs.file_observer(observer)._outFile.flush()
        with io.open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        events = [json.loads(line) for line in lines]
        self.assertEqual([e["client"] for e in events], ["n-1", "n-1"])
        # Escaped: a field never breaks a line, even where JSON would cope.
        self.assertEqual(events[1]["reason"], "line\\x0abreak")
        self.assertEqual(events[1]["log_level"]["name"], "warn")
