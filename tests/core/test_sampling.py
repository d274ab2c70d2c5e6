"""
Tests for :mod:`broadcaster.core.sampling`: the dashboard's rates, read from
the hub's counters under a :class:`twisted.internet.task.Clock`.
"""

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.sampling import Sampler, quantile_bound
from broadcaster.core.stats import KINDS, LATENCY_BUCKETS
from tests.core.test_hub import RecordingMember
from tests.support import immediate_hub


class KindMember(RecordingMember):
    """A member of a given kind."""

    def __init__(self, member_id, kind):
        super().__init__(member_id)
        self.kind = kind


class SamplerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.hub = immediate_hub(self.clock, node_id="n1")
        self.stats = self.hub.stats
        self.sampler = Sampler(self.hub, self.clock, window=5, top=2)

    def connect(self, member_id, kind="json"):
        member = KindMember(member_id, kind)
        self.hub.connect(member)
        return member

    def tick(self, seconds=1.0):
        self.clock.advance(seconds)
        return self.sampler.sample()

    def test_first_reading_gives_no_sample(self):
        """The first reading has nothing to take a rate from; nor has a
        reading taken at the same instant as the last."""
        self.assertIsNone(self.sampler.sample())
        self.assertIsNone(self.sampler.sample())
        self.assertEqual(self.sampler.samples(), [])
        self.assertIsNotNone(self.tick())

    def test_rates_per_second_since_the_last_reading(self):
        """What the counters gained is divided by the seconds between readings."""
        self.sampler.sample()
        for _ in range(10):
            self.stats.received("json", 5)
        self.stats.received("line", 5)
        self.stats.deliveries += 30
        self.stats.bytes_out += 4000
        self.stats.slow_consumers += 1
        self.stats.rate_limited += 4
        sample = self.tick(2.0)
        self.assertEqual(sample["t"], 1002.0)
        self.assertEqual(sample["node"], "n1")
        self.assertEqual(sample["messages_in"], 5.5)
        self.assertEqual(sample["deliveries"], 15.0)
        self.assertEqual(sample["bytes_out"], 2000.0)
        self.assertEqual(sample["slow_consumers"], 0.5)
        self.assertEqual(sample["rate_limited"], 2.0)
        quiet = self.tick()
        self.assertEqual(
            (quiet["messages_in"], quiet["deliveries"], quiet["bytes_out"], quiet["rate_limited"]),
            (0.0, 0.0, 0.0, 0.0),
        )

    def test_connections_by_kind_as_the_hub_counts_them(self):
        """Connections are the hub's count by kind (every known kind listed,
        at 0 if none), following connects and disconnects."""
        self.sampler.sample()
        members = [self.connect("a", "json"), self.connect("b", "json"), self.connect("c", "sse")]
        sample = self.tick()
        self.assertEqual(set(sample["connections"]), set(KINDS))
        self.assertEqual(sample["connections"]["json"], 2)
        self.assertEqual(sample["connections"]["sse"], 1)
        self.assertEqual(sample["connections"]["plain"], 0)
        self.assertEqual(sample["rooms"], 1)
        self.hub.disconnect(members[0])
        self.assertEqual(self.tick()["connections"]["json"], 1)

    def test_refusals_by_reason(self):
        """Each reason's refused handshakes, and each status's refused HTTP
        requests, per second; a reason appears once counted."""
        self.sampler.sample()
        self.assertEqual(self.tick()["refused"], {})
        self.stats.refused_handshakes["origin"] += 3
        self.stats.refused_requests["408"] += 2
        sample = self.tick()
        self.assertEqual(sample["refused"], {"origin": 3.0})
        self.assertEqual(sample["refused_requests"], {"408": 2.0})
        self.stats.refused_handshakes["auth"] += 1
        self.assertEqual(self.tick()["refused"], {"auth": 1.0, "origin": 0.0})

    def test_fan_out_time_from_the_histogram(self):
        """The mean and the 95th percentile's bucket of the fan-outs of the
        interval only; none when nothing was fanned out."""
        histogram = self.stats.fan_out_seconds
        histogram.observe(0.9)  # before the first reading: not in any sample
        self.sampler.sample()
        quiet = self.tick()
        self.assertIsNone(quiet["fan_out_mean"])
        self.assertIsNone(quiet["fan_out_p95"])
        for _ in range(19):
            histogram.observe(0.0002)
        histogram.observe(0.02)
        sample = self.tick()
        self.assertAlmostEqual(sample["fan_out_mean"], (19 * 0.0002 + 0.02) / 20)
        self.assertEqual(sample["fan_out_p95"], 0.00025)

    def test_quantile_bound(self):
        """The bucket that holds the quantile, the last bound past them all."""
        bounds = LATENCY_BUCKETS
        counts = [0] * (len(bounds) + 1)
        self.assertIsNone(quantile_bound(bounds, counts, 0.95))
        counts[2] = 90
        counts[5] = 10
        self.assertEqual(quantile_bound(bounds, counts, 0.5), bounds[2])
        self.assertEqual(quantile_bound(bounds, counts, 0.95), bounds[5])
        counts[-1] = 1000
        self.assertEqual(quantile_bound(bounds, counts, 0.95), bounds[-1])

    def test_keeps_the_last_window(self):
        """Only the last ``window`` samples are kept, oldest first."""
        self.sampler.sample()
        for _ in range(8):
            self.tick()
        self.assertEqual([s["t"] for s in self.sampler.samples()], [1004.0, 1005.0, 1006.0, 1007.0, 1008.0])

    def test_listeners_get_samples_and_ranked_rooms(self):
        """While somebody listens, each sample comes with the busiest rooms
        by members and by messages per second (unknown at the first
        ranking); nobody listening, the next ranking starts afresh."""
        heard = []

        def listener(sample, rooms):
            heard.append((sample, rooms))

        ann = self.connect("ann")
        bob = self.connect("bob")
        self.connect("cat")
        for member in (ann, bob):
            self.hub.join(member, "dev")
        self.hub.join(ann, "ops")
        self.sampler.sample()
        self.sampler.listen(listener)
        for room in ("ops", "dev", "lobby"):
            self.hub.publish_text("ann", "first", room)
        self.tick()
        [(sample, rooms)] = heard
        self.assertIs(sample, self.sampler.samples()[-1])
        self.assertEqual(rooms["count"], 3)
        self.assertEqual(
            rooms["by_members"],
            [
                {"room": "lobby", "members": 3, "rate": None},
                {"room": "dev", "members": 2, "rate": None},
            ],
        )
        self.assertEqual(rooms["by_rate"], [])

        for _ in range(4):
            self.hub.publish_text("ann", "hi", "ops")
        for _ in range(2):
            self.hub.publish_text("bob", "hi", "dev")
        self.hub.publish_text("cat", "hi")
        self.tick(2.0)
        rooms = heard[-1][1]
        self.assertEqual(
            rooms["by_rate"],
            [{"room": "ops", "members": 1, "rate": 2.0}, {"room": "dev", "members": 2, "rate": 1.0}],
        )
        self.assertEqual(rooms["by_members"][1], {"room": "dev", "members": 2, "rate": 1.0})
        self.assertEqual(rooms["by_members"][0]["rate"], 0.5)

        self.sampler.stop_listening(listener)
        self.tick()
        self.assertEqual(len(heard), 2)
        self.sampler.listen(listener)
        self.hub.publish_text("ann", "hi", "ops")
        self.tick()
        self.assertEqual(heard[-1][1]["by_rate"], [])

    def test_a_failing_listener_is_logged_and_the_others_served(self):
        """A listener that raises is logged; the others get the sample and
        the sampler goes on."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        heard = []

        def broken(sample, rooms):
            raise RuntimeError("boom")

        self.sampler.listen(broken)
        self.sampler.listen(lambda sample, rooms: heard.append(sample["t"]))
        self.sampler.sample()
        self.tick()
        self.tick()
        self.assertEqual(heard, [1001.0, 1002.0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(len([e for e in logged if e.get("log_failure")]), 2)

    def test_a_new_epoch_has_no_rate(self):
        """A room whose sequence restarted (a new epoch: Redis lost its
        data) has no rate until it has been read twice in that epoch."""
        heard = []
        self.connect("ann")
        self.sampler.sample()
        self.sampler.listen(lambda sample, rooms: heard.append(rooms["by_members"][0]["rate"]))

        def say(count):
            for _ in range(count):
                self.hub.publish_text("ann", "hi")
            self.tick()

        say(3)
        say(1)
        history = self.hub.backplane.histories.get("lobby")
        history.epoch, history.seq = "restarted", 0
        say(1)
        say(2)
        self.assertEqual(heard, [None, 1.0, None, 2.0])
