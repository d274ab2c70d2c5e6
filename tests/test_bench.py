"""
The fan-out benchmark (``python -m bench``) runs in the suite: a tiny S1 run
against a real ``twistd broadcaster``, whose every delivery the C load
generator counts and checks.  The figures themselves are not judged here;
how a run's figures are judged against the issue's targets is, on figures
made up for the purpose.
"""

import json
import os
import sys
from types import SimpleNamespace

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from bench import report
from bench.loadgen import find_compiler
from tests.support import REPO_ROOT, CollectingProcess, checkout_env

#: Seconds the quick run may take (it takes a few); then it is killed.
DEADLINE = 240


class BenchSmokeTests(TestCase):
    timeout = DEADLINE + 30

    def setUp(self):
        if find_compiler() is None:
            message = (
                "no C compiler (cc): the benchmark compiles its load generator,"
                " bench/loadgen.c, at run time; install one, e.g. apt-get install gcc"
            )
            if os.environ.get("CI"):
                self.fail(message)
            raise SkipTest(message)

    @inlineCallbacks
    def quick_run(self, servers: str, scenarios: str):
        """
        ``python -m bench --quick`` of ``servers`` in ``scenarios``, which
        must succeed.

        :return: a Deferred firing with its results document, stdout,
            stderr and results file (``document``, ``out``, ``err``,
            ``path``).
        """
        path = os.path.abspath(self.mktemp() + ".json")
        out, err, status = yield self.run_bench(
            "--quick", "--servers", servers, "--scenarios", scenarios,
            "--json-out", path, "--cache-dir", os.path.abspath(self.mktemp()),
        )
        self.assertEqual(status, 0, "stdout:\n{}\nstderr:\n{}".format(out, err))
        with open(path) as f:
            document = json.load(f)
        return SimpleNamespace(document=document, out=out, err=err, path=path)

    @inlineCallbacks
    def run_bench(self, *args):
        """
        Run ``python -m bench`` from the repository root, killing it if it
        overruns :data:`DEADLINE`.

        :return: a Deferred firing with ``(stdout, stderr, exit status)``.
        """
        env = checkout_env()
        process = CollectingProcess()
        reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", "bench", *args], env=env, path=REPO_ROOT
        )
        overrun = []

        def kill():
            overrun.append(True)
            process.transport.signalProcess("KILL")

        deadline = reactor.callLater(DEADLINE, kill)
        try:
            result = yield process.ended()
        finally:
            if deadline.active():
                deadline.cancel()
        if overrun:
            self.fail("python -m bench ran past {} s; stderr:\n{}".format(DEADLINE, result[1]))
        return result

    @inlineCallbacks
    def test_quick_run_counts_and_checks_every_delivery(self):
        """A quick S1 run on broadcaster exits 0 with every message delivered once, in order, to every subscriber."""
        bench = yield self.quick_run("broadcaster", "S1")
        document = bench.document
        self.assertTrue(document["ok"])
        runs = document["runs"]
        self.assertEqual([(r["scenario"], r["server"]) for r in runs], [("S1", "broadcaster")])
        run = runs[0]
        self.assertEqual(run["problems"], [])
        result = run["loadgen"]
        check = result["check"]
        self.assertGreater(result["sent"], 0)
        self.assertEqual(check["expected_deliveries"], result["sent"] * result["subscribers"])
        self.assertEqual(check["deliveries"], check["expected_deliveries"])
        self.assertEqual(check["publisher_echoes"], result["sent"])
        for error in ("lost", "order_errors", "duplicates", "corrupt", "protocol_errors"):
            self.assertEqual(check[error], 0, error)
        self.assertTrue(check["complete"])
        self.assertIn("deliveries/s", bench.out)
        # A chart per scenario beside the results (matplotlib is a test extra).
        chart = os.path.join(os.path.dirname(bench.path), "S1.svg")
        with open(chart) as f:
            svg = f.read()
        self.assertIn("<svg", svg)
        self.assertIn("broadcaster", svg)
        self.assertIn("charts: " + chart, bench.out)
        # The floor no server can beat is measured beside the figures.
        floor = document["floor"]
        self.assertEqual(floor["connections"], document["settings"]["s2_subscribers"])
        self.assertGreater(floor["us_per_send"], 0)
        self.assertIn("system floor: a bare send()", bench.out)

    @inlineCallbacks
    def test_quick_run_of_the_c_reference(self):
        """The C reference server (bench/ref_c.c, built at run time) passes
        the same delivery check: every message to every subscriber once, in
        order."""
        bench = yield self.quick_run("c", "S1")
        (run,) = bench.document["runs"]
        self.assertEqual((run["server"], run["problems"]), ("c", []))
        check = run["loadgen"]["check"]
        self.assertEqual(check["deliveries"], check["expected_deliveries"])
        self.assertTrue(check["complete"])

    @inlineCallbacks
    def test_quick_run_of_the_pure_python_reference(self):
        """The pure-Python reference (bench/ref_python.py) passes the same
        delivery check, in the throughput and the latency scenario."""
        bench = yield self.quick_run("python", "S1,S2")
        runs = bench.document["runs"]
        self.assertEqual({run["scenario"] for run in runs}, {"S1", "S2"})
        for run in runs:
            self.assertEqual((run["server"], run["problems"]), ("python", []))
            check = run["loadgen"]["check"]
            self.assertEqual(check["deliveries"], check["expected_deliveries"])
            self.assertTrue(check["complete"])

    @inlineCallbacks
    def test_quick_big_room(self):
        """A quick S6 run lists every member of a 200-member lobby, named by
        the load generator, and measures the welcome and the listing."""
        bench = yield self.quick_run("broadcaster", "S6")
        document = bench.document
        (run,) = document["runs"]
        self.assertEqual((run["variant"], run["problems"]), ("S6/200", []))
        figures = run["figures"]
        self.assertGreater(figures["welcome_ms"], 0)
        # Two pages after the welcome's: 100 + 100 + 1 members.
        self.assertGreater(figures["list_kib"], 0)
        self.assertLess(figures["welcome_kib"], 16)
        self.assertIn("every member listed", bench.err)

    @inlineCallbacks
    def test_quick_storm_and_slow_consumers(self):
        """
        Quick S8 (a storm of 200 connections) and S9 (subscribers of which
        two read slowly and one not at all, and the same with everyone
        reading) runs on broadcaster and the C reference count every
        connection and check every delivery to the others; broadcaster cuts
        the stalled subscriber.
        """
        bench = yield self.quick_run("broadcaster,c", "S8,S9")
        document = bench.document
        self.assertTrue(document["ok"])
        runs = {(r["variant"], r["server"]): r for r in document["runs"]}
        self.assertEqual(
            sorted(runs),
            sorted(
                (variant, server)
                for variant in ("S8/200", "S9/baseline", "S9/slow")
                for server in ("broadcaster", "c")
            ),
        )
        for server in ("broadcaster", "c"):
            storm = runs["S8/200", server]
            self.assertEqual(storm["problems"], [], server)
            result = storm["loadgen"]
            self.assertEqual((result["opened"], result["open"]), (200, 200), server)
            self.assertTrue(result["complete"], server)
            self.assertEqual(result["handshake_ms"]["count"], 200, server)
        # broadcaster greets each connection; everyone hears of every later arrival.
        greeted = runs["S8/200", "broadcaster"]["loadgen"]
        self.assertEqual(greeted["greeted"], 200)
        self.assertGreaterEqual(greeted["announcements"], 200 * 201 // 2)
        for variant, odd in (("S9/baseline", 0), ("S9/slow", 3)):
            for server in ("broadcaster", "c"):
                run = runs[variant, server]
                self.assertEqual(run["problems"], [], (variant, server))
                result = run["loadgen"]
                check = result["check"]
                self.assertEqual(result["honest"], result["subscribers"] - odd)
                self.assertGreater(result["sent"], 0)
                self.assertEqual(check["expected_deliveries"], result["sent"] * result["honest"])
                self.assertEqual(check["deliveries"], check["expected_deliveries"])
                for error in ("lost", "order_errors", "duplicates", "corrupt", "protocol_errors"):
                    self.assertEqual(check[error], 0, (variant, server, error))
                self.assertTrue(check["complete"], (variant, server))
        cut = runs["S9/slow", "broadcaster"]["loadgen"]["stalled"]
        self.assertEqual((cut["cut"], cut["how"], cut["close_code"]), (1, "close", 4008))
        self.assertEqual(runs["S9/slow", "c"]["loadgen"]["stalled"]["how"], "open")
        self.assertIn("S9 stalled subscriber on broadcaster: cut", bench.out)
        self.assertIn("S9 stalled subscriber on c-ref: not cut", bench.out)
        for name in ("S8.svg", "S9.svg"):
            with open(os.path.join(os.path.dirname(bench.path), name)) as f:
                self.assertIn("<svg", f.read())

    @inlineCallbacks
    def test_quick_cross_node_and_workers(self):
        """
        Quick S4 (two nodes through Redis) and S5 (one process, --workers 2)
        runs check every delivery and leave no process behind.
        """
        from bench.servers import redis_server_path

        if redis_server_path() is None:
            message = "redis-server is not installed (apt-get install redis-server)"
            if os.environ.get("CI"):
                self.fail(message)
            raise SkipTest(message)
        bench = yield self.quick_run("broadcaster", "S4,S5,S7")
        document = bench.document
        self.assertTrue(document["ok"])
        self.assertEqual(
            [r["variant"] for r in document["runs"]], ["S4/20", "S5/20/w1", "S5/20/w2", "S7"]
        )
        s7 = document["runs"][3]
        self.assertEqual(s7["problems"], [])
        self.assertEqual(set(s7["cpu_seconds"]), {"a", "b", "redis"})
        for run in document["runs"][:3]:
            self.assertEqual(run["problems"], [], run["variant"])
            check = run["loadgen"]["check"]
            self.assertEqual(check["deliveries"], check["expected_deliveries"], run["variant"])
            self.assertTrue(check["complete"], run["variant"])
        s4 = document["runs"][0]["server_process"]
        pids = [s4["pid"], s4["node_a"]["pid"], s4["redis"]["pid"]]
        pids += document["runs"][2]["server_process"]["descendants"]
        for pid in pids:
            self.assertFalse(os.path.exists("/proc/{}/cmdline".format(pid)) and _alive(pid), pid)
        self.assertEqual(
            [c["what"].split(",")[0] for c in document["comparisons"]],
            ["S5 --workers 2 / one process"],
        )


def _alive(pid):
    """Whether ``pid`` is a live, not zombie, process."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _row(variant, metric, median, label="", ratio=None, values=None):
    values = values if values is not None else [median]
    return {
        "scenario": variant.split("/")[0], "variant": variant, "variant_label": label,
        "metric": metric, "server": "broadcaster", "median": median, "values": values,
        "min": min(values), "max": max(values), "ratio_to_reference": ratio,
    }


class SummaryTests(SynchronousTestCase):
    """Each figure against both references: Autobahn's and the C server's."""

    def test_ratios_to_autobahn_and_to_the_limit(self):
        from bench.scenarios import SCENARIOS, Settings

        scenario = SCENARIOS["S1"]
        variant = scenario.variants(Settings(s1_subscribers=[1000]))[0]
        runs = [
            {"variant": variant.key, "server": server, "figures": {"deliveries_per_s": value}}
            for server, value in (("broadcaster", 3e6), ("autobahn", 2e5), ("c", 2.5e6))
        ]
        rows = report.summarize([(scenario, variant)], runs, ["broadcaster", "autobahn", "c"])
        mine = {
            r["server"]: (r["ratio_to_reference"], r["ratio_to_limit"])
            for r in rows if r["metric"] == "deliveries_per_s"
        }
        self.assertEqual(mine["broadcaster"], (15.0, 1.2))
        self.assertEqual(mine["autobahn"], (1.0, 0.08))
        self.assertEqual(mine["c"], (12.5, None))
        table = report.format_table(rows, [])
        self.assertIn("3,000,000 (×15.00) [c ×1.20]", table)
        self.assertIn("[c ×N]: the median divided by c-ref's", table)


class SlowConsumerTests(SynchronousTestCase):
    """S9 in the report: the p99 ratio per server, and the stalled subscriber's fate."""

    def test_p99_ratio_per_server(self):
        """Each server's p99 with slow consumers over its own without, judged against 1.2."""
        rows = [
            dict(_row("S9/baseline", "latency_p99_ms", 10.0), server="broadcaster"),
            dict(_row("S9/slow", "latency_p99_ms", 11.0), server="broadcaster"),
            dict(_row("S9/baseline", "latency_p99_ms", 20.0), server="autobahn"),
            dict(_row("S9/slow", "latency_p99_ms", 30.0), server="autobahn"),
        ]
        found = {c["server"]: c for c in report.comparisons(rows)}
        self.assertAlmostEqual(found["broadcaster"]["ratio"], 1.1)
        self.assertTrue(found["broadcaster"]["meets_target"])
        self.assertFalse(found["autobahn"]["meets_target"])
        lines = report.format_comparisons([found["broadcaster"]])
        self.assertEqual(
            lines,
            ["S9 p99 latency with slow consumers / without, broadcaster: 11.00 / 10.00 = ×1.10"
             " (target ≤ ×1.2: met)"],
        )

    def test_stalled_cut_or_not(self):
        """Whether the stalled subscriber was cut is said per server, "not cut" included."""

        def run(server, how, code, received):
            return {
                "variant": "S9/slow", "server": server, "max_buffer": 65536 if how == "close" else None,
                "loadgen": {"sent": 120, "stalled": {
                    "count": 1, "cut": int(how != "open"), "how": how, "close_code": code,
                    "received": received,
                }},
            }

        items = report.stalled_cuts([run("broadcaster", "close", 4008, 29), run("c", "open", -1, 120)])
        self.assertEqual(
            report.format_stalled(items),
            [
                "S9 stalled subscriber on broadcaster: cut in 1 of 1 runs (close 4008; it got 29"
                " of 120 messages); --max-buffer 65536",
                "S9 stalled subscriber on c-ref: not cut (no buffer limit; it got 120 of 120"
                " messages once it read again)",
            ],
        )


class TargetsTests(SynchronousTestCase):
    """A run's figures against the issue's targets (``report.targets``)."""

    floor = {"connections": 1000, "size": 64, "rounds": 30, "us_per_send": 9.2, "round_ms": 9.2}

    def verdicts(self, rows, s2_subscribers=1000):
        return {
            item["what"].split(",")[0]: item["meets_target"]
            for item in report.targets(rows, s2_subscribers, self.floor)
        }

    def test_each_target_met_or_not(self):
        """S1's ratio, S2's p99 and loss, and S3's memory at each count are judged."""
        rows = [
            _row("S1/1000", "deliveries_per_s", 2.4e6, ratio=3.1),
            _row("S2/200", "latency_p99_ms", 10.0),
            _row("S2/200", "lost", 0),
            _row("S3/5000", "rss_kib_per_conn", 4.6, "5000 idle connections"),
            _row("S3/20000", "rss_kib_per_conn", 8.2, "20000 idle connections"),
        ]
        self.assertEqual(
            self.verdicts(rows),
            {
                "S1 1000 subscribers": True,
                "S2 1000 subscribers": True,
                "S3 5000 idle connections": True,
                "S3 20000 idle connections": False,
            },
        )

    def test_a_loss_in_any_run_fails_latency(self):
        """S2 is not met if any run lost a delivery, however good the p99."""
        rows = [
            _row("S2/200", "latency_p99_ms", 4.0),
            _row("S2/200", "lost", 0, values=[0, 0, 3]),
        ]
        self.assertEqual(self.verdicts(rows), {"S2 1000 subscribers": False})
        (line,) = report.format_targets(report.targets(rows, 1000, self.floor))
        self.assertIn("4.0 ms, 3 lost (target ≤ 10 ms, none lost: not met)", line)
        self.assertIn("bare send()s to 1000 sockets takes 9.2 ms here", line)

    def test_storm_against_autobahn(self):
        """S8 at 5000 connections is met when broadcaster opens them at least as fast
        as the Autobahn reference (its time at most ×1.0 Autobahn's)."""
        for ratio, met in ((0.9, True), (1.3, False)):
            rows = [_row("S8/5000", "storm_s", 2.0, ratio=ratio)]
            self.assertEqual(
                self.verdicts(rows), {"S8 5000 connections": met}
            )

    def test_only_under_the_targets_conditions(self):
        """No S1 verdict without the reference beside it, none for S2 with
        another subscriber count."""
        rows = [
            _row("S1/1000", "deliveries_per_s", 2.4e6, ratio=None),
            _row("S2/200", "latency_p99_ms", 4.0),
            _row("S2/200", "lost", 0),
        ]
        self.assertEqual(self.verdicts(rows, s2_subscribers=20), {})


class BaselineTests(SynchronousTestCase):
    """``--baseline REV`` runs broadcaster as it was at REV."""

    def test_the_baseline_imports_its_own_broadcaster(self):
        """The baseline server runs where python -c finds the unpacked
        revision's broadcaster first, not this checkout's."""
        import shutil
        import subprocess

        from bench import servers

        spec = servers.add_baseline("HEAD")
        self.addCleanup(servers.SERVERS.pop, spec.name, None)
        self.addCleanup(shutil.rmtree, spec.cwd, True)
        env = spec.argv(0)[1]
        self.assertTrue(env.startswith("PYTHONPATH="))
        found = subprocess.run(
            ["env", env, sys.executable, "-c", "import broadcaster; print(broadcaster.__file__)"],
            cwd=spec.cwd, capture_output=True, check=True,
        ).stdout.decode().strip()
        self.assertEqual(os.path.dirname(os.path.dirname(found)), os.path.realpath(spec.cwd))
