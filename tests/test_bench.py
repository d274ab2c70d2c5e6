"""
The fan-out benchmark (``python -m bench``) runs in the suite: a tiny S1 run
against a real ``twistd broadcaster``, whose every delivery the C load
generator counts and checks.  The figures themselves are not judged here.
"""

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

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
        results = os.path.abspath(self.mktemp() + ".json")
        out, err, status = yield self.run_bench(
            "--quick", "--servers", "broadcaster", "--scenarios", "S1",
            "--json-out", results, "--cache-dir", os.path.abspath(self.mktemp()),
        )
        self.assertEqual(status, 0, "stdout:\n{}\nstderr:\n{}".format(out, err))
        with open(results) as f:
            document = json.load(f)
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
        self.assertIn("deliveries/s", out)
        # The floor no server can beat is measured beside the figures.
        floor = document["floor"]
        self.assertEqual(floor["connections"], document["settings"]["s2_subscribers"])
        self.assertGreater(floor["us_per_send"], 0)
        self.assertIn("system floor: a bare send()", out)

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
        results = os.path.abspath(self.mktemp() + ".json")
        out, err, status = yield self.run_bench(
            "--quick", "--servers", "broadcaster", "--scenarios", "S4,S5",
            "--json-out", results, "--cache-dir", os.path.abspath(self.mktemp()),
        )
        self.assertEqual(status, 0, "stdout:\n{}\nstderr:\n{}".format(out, err))
        with open(results) as f:
            document = json.load(f)
        self.assertTrue(document["ok"])
        self.assertEqual(
            [r["variant"] for r in document["runs"]], ["S4/20", "S5/20/w1", "S5/20/w2"]
        )
        for run in document["runs"]:
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
