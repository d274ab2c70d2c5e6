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
from tests.support import REPO_ROOT, CollectingProcess

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
        path = [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
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
