"""
Tests for :mod:`broadcaster.service.secrets`: secrets from files and the
environment, the warnings for those on the command line, what a
``--workers`` master hands its workers (argv without secrets, environment
with them), and a real ``twistd broadcaster --workers 2`` whose every
process's command line is read from ``/proc``.
"""

import json
import os
import signal
import stat
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from broadcaster.http.webhooks import sign
from broadcaster.redis.address import RedisAddress
from broadcaster.service import secrets
from broadcaster.service.secrets import (
    MAX_SECRET_FILE,
    REDIS_PASSWORD,
    WORKER_API_KEYS,
    WORKER_JWT_SECRET,
    WORKER_WEBHOOK_SECRET,
    read_secret_file,
)
from broadcaster.service.tap import Options, makeService
from broadcaster.service.workers import TWISTD, MasterService
from tests.http.test_api import publish
from tests.http.test_webhooks import Receiver, serve
from tests.redis.test_redis import PASSWORD, RedisServer, require_redis_server
from tests.service.test_workers import FakeBinder, FakeSpawner, alive
from tests.support import CollectingProcess, checkout_env, start_twistd, wait_for

HOOK_SECRET = "hook-7f3a91e2"
API_KEY = "key-c4d81b06"
REDIS_SECRET = "redis-5e2b7a90"


def parse(*args, environ=None):
    options = Options(environ={} if environ is None else environ)
    options.parseOptions(list(args))
    return options


class FileTestCase(SynchronousTestCase):
    def write(self, content, mode=0o600):
        """A new file holding ``content`` (bytes or text); its path."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        os.chmod(path, mode)
        return path

    def assertRefused(self, args, *fragments, environ=None):
        """Parsing ``args`` is a usage error holding every fragment; return its text."""
        error = str(self.assertRaises(UsageError, parse, *args, environ=environ))
        for fragment in fragments:
            self.assertIn(fragment, error)
        return error


class SecretFileTests(FileTestCase):
    def test_the_secret_is_the_file_s_text_without_its_line_breaks(self):
        """--webhook-secret-file gives the file's text, less the line breaks at
        its end; spaces inside or around it are the secret's."""
        options = parse("--webhook-secret-file", self.write(HOOK_SECRET + "\r\n\n"))
        self.assertEqual(options["webhook-secret"], HOOK_SECRET)
        self.assertEqual(read_secret_file("x", self.write(" a b ")), " a b ")

    def test_not_with_webhook_secret(self):
        """--webhook-secret and --webhook-secret-file together are refused, naming both."""
        path = self.write(HOOK_SECRET)
        error = self.assertRefused(
            ["--webhook-secret", "other", "--webhook-secret-file", path],
            "--webhook-secret and --webhook-secret-file",
            "only one",
        )
        self.assertNotIn(HOOK_SECRET, error)

    def test_hostile_files_are_refused_naming_the_flag_never_the_content(self):
        """A missing, empty, blank, non-UTF-8, oversized file or a directory is
        refused with the flag, the path and why, and not a byte of the file."""
        marker = "do-not-print-me"
        missing = os.path.join(self.mktemp(), "secret")
        directory = self.mktemp()
        os.mkdir(directory)
        cases = [
            (missing, "No such file"),
            (self.write(""), "is empty"),
            (self.write("\n\r\n"), "is empty"),
            (directory, "Is a directory"),
            (self.write(marker.encode() + b"\xff\xfe"), "not UTF-8"),
            (self.write(marker * (MAX_SECRET_FILE // len(marker) + 1)), "larger than 65536"),
        ]
        for flag, extra in [
            ("--webhook-secret-file", []),
            ("--redis-password-file", ["--redis", "redis://127.0.0.1"]),
        ]:
            for path, reason in cases:
                error = self.assertRefused([*extra, flag, path], flag, repr(path), reason)
                self.assertNotIn(marker, error)

    def test_an_unreadable_file_is_refused(self):
        """A path that cannot be read as a file is refused with the flag and
        why: one the reader may not open, or (readable by no one, root
        included) a directory."""
        if os.geteuid() != 0:
            path = self.write(HOOK_SECRET, mode=0)
            self.assertRefused(
                ["--webhook-secret-file", path], "--webhook-secret-file", "Permission denied"
            )
        directory = self.mktemp()
        os.mkdir(directory)
        self.assertRefused(
            ["--webhook-secret-file", directory], "--webhook-secret-file", "Is a directory"
        )

    def test_api_key_file_errors_hold_no_content(self):
        """An --api-key-file that is not UTF-8 is refused without quoting a byte of it."""
        path = self.write(b"key-one\n\xe9t\xe9\n")
        error = self.assertRefused(["--api-key-file", path], "--api-key-file", "not UTF-8")
        self.assertNotIn("key-one", error)
        self.assertNotIn("0xe9", error)


class RedisPasswordTests(FileTestCase):
    def test_from_a_file(self):
        """--redis-password-file gives the password; the URL's user name is kept."""
        options = parse(
            "--redis", "redis://ann@127.0.0.1:6390/2",
            "--redis-password-file", self.write(REDIS_SECRET + "\n"),
        )
        self.assertEqual(
            options["redis-address"],
            RedisAddress(host="127.0.0.1", port=6390, db=2, password=REDIS_SECRET, username="ann"),
        )

    def test_from_the_environment(self):
        """Without a password in the URL or a file, BROADCASTER_REDIS_PASSWORD
        gives it (for unix: addresses too); an empty one is no password."""
        options = parse("--redis", "unix:/run/r.sock", environ={REDIS_PASSWORD: REDIS_SECRET})
        self.assertEqual(options["redis-address"].password, REDIS_SECRET)
        options = parse("--redis", "redis://127.0.0.1", environ={REDIS_PASSWORD: ""})
        self.assertIsNone(options["redis-address"].password)
        self.assertNotIn("redis-address", parse(environ={REDIS_PASSWORD: REDIS_SECRET}))

    def test_the_url_and_the_file_come_before_the_environment(self):
        """A password in the URL, or else in the file, wins over the variable."""
        environ = {REDIS_PASSWORD: "from-env"}
        options = parse("--redis", "redis://:from-url@127.0.0.1", environ=environ)
        self.assertEqual(options["redis-address"].password, "from-url")
        options = parse(
            "--redis", "redis://127.0.0.1", "--redis-password-file", self.write("from-file"),
            environ=environ,
        )
        self.assertEqual(options["redis-address"].password, "from-file")

    def test_not_in_the_url_and_a_file(self):
        """A password in the URL and --redis-password-file together are refused,
        without either password in the message."""
        error = self.assertRefused(
            [
                "--redis", "redis://:{}@127.0.0.1".format(REDIS_SECRET),
                "--redis-password-file", self.write("other-password"),
            ],
            "--redis holds a password and --redis-password-file",
        )
        self.assertNotIn(REDIS_SECRET, error)
        self.assertNotIn("other-password", error)

    def test_the_file_needs_redis(self):
        """--redis-password-file without --redis is refused."""
        self.assertRefused(
            ["--redis-password-file", self.write(REDIS_SECRET)],
            "--redis-password-file needs --redis",
        )

    def test_a_bad_url_is_quoted_without_its_password(self):
        """A --redis URL that does not parse is quoted in the error with its password hidden."""
        for url in [
            "redis://:{}@127.0.0.1:99999".format(REDIS_SECRET),
            "redis://ann:{}@127.0.0.1/zero".format(REDIS_SECRET),
            "redis://:{}@127.0.0.1/0?timeout=1".format(REDIS_SECRET),
            "unix:/r.sock?password={}&db=x".format(REDIS_SECRET),
        ]:
            error = self.assertRefused(["--redis", url], "--redis", "***")
            self.assertNotIn(REDIS_SECRET, error)


class CommandLineWarningTests(FileTestCase):
    def warnings(self, *args):
        """The [CONFIG] warnings makeService logs for ``args``, as text."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        makeService(parse(*args), reactor=MemoryReactorClock())
        texts = [formatEvent(event) for event in logged]
        for event, text in zip(logged, texts):
            for secret in (HOOK_SECRET, API_KEY, REDIS_SECRET):
                self.assertNotIn(secret, repr(event) + text)
        return [text for text in texts if "on the command line" in text]

    def test_each_secret_on_the_command_line_is_warned_about(self):
        """--webhook-secret, --api-key and a password in --redis each get a
        warning naming the flag and its alternative, never the secret; by a
        --workers master too."""
        args = [
            "--webhook", "http://127.0.0.1:1/hook", "--webhook-secret", HOOK_SECRET,
            "--api-key", API_KEY, "--api-key", "key-2",
            "--redis", "redis://:{}@127.0.0.1:6390".format(REDIS_SECRET),
        ]
        expected = [
            "[CONFIG] --webhook-secret puts a secret on the command line, where every"
            " local user can read it (ps, /proc/<pid>/cmdline); use --webhook-secret-file"
            " instead",
            "[CONFIG] --api-key puts a secret on the command line, where every local user"
            " can read it (ps, /proc/<pid>/cmdline); use --api-key-file instead",
            "[CONFIG] --redis puts a secret on the command line, where every local user can"
            " read it (ps, /proc/<pid>/cmdline); use --redis-password-file or the"
            " BROADCASTER_REDIS_PASSWORD environment variable instead",
        ]
        self.assertEqual(self.warnings(*args), expected)
        self.assertEqual(self.warnings("--workers", "2", *args), expected)

    def test_secrets_from_files_are_not_warned_about(self):
        """Secrets from files and the environment, and a --redis URL without a
        password, draw no warning."""
        warnings = self.warnings(
            "--webhook", "http://127.0.0.1:1/hook",
            "--webhook-secret-file", self.write(HOOK_SECRET),
            "--api-key-file", self.write(API_KEY),
            "--redis", "redis://127.0.0.1:6390", "--redis-password-file", self.write(REDIS_SECRET),
        )
        self.assertEqual(warnings, [])


def master_options(*args, environ=None):
    """The options of a --workers 2 master that joins an external Redis."""
    return parse("--workers", "2", *args, environ=environ)


class WorkerHandOverTests(FileTestCase):
    def test_worker_arguments_hold_no_secret(self):
        """A worker gets the user's options in order, long names and all, less
        every secret option however it was spelt, and --redis without its
        password; the secrets go in its environment."""
        options = master_options(
            "-p", "tcp:9001", "--webhook-secret=" + HOOK_SECRET,
            "--api-key=" + API_KEY, "--api-key-f", self.write("key-2\n"),
            "--webhook", "http://127.0.0.1:1/hook", "--debug",
            "--redis", "redis://ann:{}@127.0.0.1:6390/1".format(REDIS_SECRET),
            "--rate", "5",
        )
        self.assertEqual(
            options["worker-args"],
            [
                "--workers", "2", "--port", "tcp:9001", "--webhook", "http://127.0.0.1:1/hook",
                "--debug", "--redis", "redis://ann@127.0.0.1:6390/1", "--rate", "5",
            ],
        )
        self.assertEqual(
            options["worker-env"],
            {
                WORKER_WEBHOOK_SECRET: HOOK_SECRET,
                WORKER_API_KEYS: json.dumps([API_KEY, "key-2"]),
                WORKER_JWT_SECRET: None,
                REDIS_PASSWORD: REDIS_SECRET,
            },
        )
        files = master_options(
            "--webhook-secret-file", self.write(HOOK_SECRET), "--redis", "unix:/run/r.sock",
            "--redis-password-file", self.write(REDIS_SECRET),
        )
        self.assertEqual(files["worker-args"], ["--workers", "2", "--redis", "unix:/run/r.sock"])

    def test_variables_without_a_secret_are_removed(self):
        """Without secrets (and with a private Redis) every secret variable is
        to be removed from a worker's environment, BROADCASTER_REDIS_PASSWORD
        included: the private Redis has no password."""
        options = master_options(environ={REDIS_PASSWORD: REDIS_SECRET})
        self.assertEqual(
            options["worker-env"],
            {
                WORKER_WEBHOOK_SECRET: None,
                WORKER_API_KEYS: None,
                WORKER_JWT_SECRET: None,
                REDIS_PASSWORD: None,
            },
        )

    def test_a_worker_reads_the_secrets_from_its_environment(self):
        """A worker (--worker-fds) parsing what its master gives it ends with
        the master's secrets."""
        master = master_options(
            "--webhook-secret-file", self.write(HOOK_SECRET),
            "--api-key-file", self.write(API_KEY),
            "--redis", "redis://ann@127.0.0.1:6390", "--redis-password-file", self.write(REDIS_SECRET),
        )
        environ = {k: v for k, v in master["worker-env"].items() if v is not None}
        worker = parse(
            *master["worker-args"], "--workers", "1", "--worker-fds", "port=3",
            "--node-id", "m-w0", environ=environ,
        )
        self.assertEqual(worker["webhook-secret"], HOOK_SECRET)
        self.assertEqual(worker["api-keys"], [API_KEY])
        self.assertEqual(worker["redis-address"], master["redis-address"])
        self.assertEqual(worker["secrets-on-command-line"], [])

    def test_a_single_server_ignores_the_worker_variables(self):
        """Without --worker-fds the internal variables mean nothing: a stray
        one cannot turn the API on."""
        environ = {WORKER_WEBHOOK_SECRET: HOOK_SECRET, WORKER_API_KEYS: json.dumps([API_KEY])}
        options = parse(environ=environ)
        self.assertEqual((options["webhook-secret"], options["api-keys"]), (None, []))

    def test_a_malformed_key_list_is_refused(self):
        """A worker whose key variable is not a JSON list of keys stops, naming
        the variable and not its content."""
        for text in [API_KEY, json.dumps(API_KEY), json.dumps([API_KEY, 1]), "[\"\"]"]:
            error = self.assertRefused(
                ["--worker-fds", "port=3"], WORKER_API_KEYS, environ={WORKER_API_KEYS: text}
            )
            self.assertNotIn(API_KEY, error)

    def test_make_service_hands_the_master_both(self):
        """makeService gives the master the arguments and the environment."""
        options = master_options(
            "--api-key-file", self.write(API_KEY), "--redis", "redis://127.0.0.1:6390"
        )
        master = makeService(options, reactor=MemoryReactorClock())
        self.assertIsInstance(master, MasterService)
        self.assertEqual(master._worker_args, options["worker-args"])
        self.assertEqual(master._worker_env, options["worker-env"])


class MasterEnvironmentTests(SynchronousTestCase):
    def start(self, redis_server=None):
        self.patch(os, "environ", dict(os.environ, KEPT="1", **{REDIS_PASSWORD: "user's"}))
        self.spawner = FakeSpawner()
        master = MasterService(
            MemoryReactorClock(),
            2,
            [("port", "tcp:9999", "WebSocket endpoint and chat page")],
            ["--port", "tcp:9999"],
            node_id="m",
            stop_timeout=5.0,
            redis_server=redis_server,
            spawn=self.spawner,
            bind=FakeBinder(),
            python="/usr/bin/python3",
            worker_env=secrets.worker_environment(HOOK_SECRET, [API_KEY], None),
        )
        master.privilegedStartService()
        master.startService()
        self.addCleanup(self.stop, master)
        return master

    def stop(self, master):
        d = master.stopService()
        for spawned in self.spawner.spawned:
            if not spawned.process.ended:
                spawned.end()
        self.successResultOf(d)

    def test_workers_get_the_secrets_in_their_environment_only(self):
        """Each worker's environment is the master's with the secrets set and
        the variables without one removed; its arguments hold none."""
        self.start()
        for worker in self.spawner.workers():
            self.assertEqual(worker.env["KEPT"], "1")
            self.assertEqual(worker.env[WORKER_WEBHOOK_SECRET], HOOK_SECRET)
            self.assertEqual(json.loads(worker.env[WORKER_API_KEYS]), [API_KEY])
            self.assertNotIn(REDIS_PASSWORD, worker.env)
            for secret in (HOOK_SECRET, API_KEY):
                self.assertNotIn(secret, " ".join(worker.args))

    def test_the_private_redis_gets_no_secret(self):
        """The private redis-server's environment holds none of the secret
        variables, and its command line no password."""
        master = self.start(redis_server="/usr/bin/redis-server")
        (redis,) = self.spawner.redis()
        self.assertEqual(redis.env["KEPT"], "1")
        for name in secrets.SECRET_VARIABLES:
            self.assertNotIn(name, redis.env)
        self.assertNotIn("--requirepass", redis.args)
        self.assertEqual(oct(stat.S_IMODE(os.stat(master.redis_directory).st_mode)), "0o700")


# The real thing


def descendants(pid: int):
    """The pids of every living process below ``pid``, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(entry)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return [child for child in found if alive(child)]


def command_line(pid: int) -> str:
    with open("/proc/{}/cmdline".format(pid), "rb") as f:
        return f.read().replace(b"\0", b" ").decode("utf-8", "replace")


class EndToEndTests(TestCase):
    timeout = 180

    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text + "\n")
        os.chmod(path, 0o600)
        return path

    @inlineCallbacks
    def start(self, secret_args):
        """
        Start ``twistd broadcaster --workers 2`` on a Redis with a password
        and with a webhook, with ``secret_args(redis)``; wait until both
        workers have logged in to Redis.

        :return: ``(process, port, redis, receiver)``.
        """
        if not sys.platform.startswith("linux"):
            raise SkipTest("reads /proc")
        require_redis_server()
        redis = RedisServer(self)
        yield redis.start()
        receiver = Receiver()
        hooks = serve(self, receiver)
        process, port = yield start_twistd(
            self,
            ["--workers", "2", "--webhook", hooks.url + "/hook", *secret_args(redis)],
        )
        self.addCleanup(self.kill_left_over, process.transport.pid)
        yield wait_for(
            lambda: process.output().count("connected to Redis at") >= 2
            or process.result is not None,
            timeout=60,
            what="two workers logged in to Redis",
        )
        self.assertIsNone(process.result)
        self.assertIn("connected to Redis at redis://:***@127.0.0.1", process.output())
        return process, port, redis, receiver

    @inlineCallbacks
    def check(self, process, port, redis, receiver, master_too):
        """
        Neither the workers' command lines nor (if ``master_too``) the
        master's hold a secret, yet the API takes the key and the webhooks
        are signed with the secret; the master stops cleanly.
        """
        master = process.transport.pid
        workers = [pid for pid in descendants(master) if "--worker-fds" in command_line(pid)]
        self.assertEqual(len(workers), 2, [command_line(p) for p in descendants(master)])
        for pid in ([master] if master_too else []) + descendants(master):
            line = command_line(pid)
            for secret in (HOOK_SECRET, API_KEY, PASSWORD):
                self.assertNotIn(secret, line, "pid {}: {}".format(pid, line))
        for pid in workers:
            self.assertIn("--redis redis://127.0.0.1:{}/0 ".format(redis.port), command_line(pid))
            # The environment that carries the secrets is its user's alone.
            environ = "/proc/{}/environ".format(pid)
            self.assertEqual(stat.S_IMODE(os.stat(environ).st_mode), 0o400)

        status, _, body = yield publish(port, {"text": "from a script"}, key=API_KEY)
        self.assertEqual(status, 202, body)
        status, _, _ = yield publish(port, {"text": "x"}, key="wrong-key")
        self.assertEqual(status, 401)
        while True:
            received = yield receiver.next()
            if any(e.get("text") == "from a script" for e in received.events):
                break
        self.assertEqual(
            received.headers[b"x-broadcaster-signature"],
            sign(received.body, HOOK_SECRET.encode()),
        )

        process.transport.signalProcess("TERM")
        out, err, status = yield process.ended()
        self.assertEqual(status, 0, out + err)
        for secret in (HOOK_SECRET, API_KEY, PASSWORD):
            self.assertNotIn(secret, out + err)
        return out

    @inlineCallbacks
    def test_secrets_in_files_are_on_no_command_line(self):
        """With --workers 2 and the secrets in files, neither the master's nor
        any worker's command line holds one, yet the workers sign webhooks
        with the secret, accept the API key and log in to Redis."""
        started = yield self.start(
            lambda redis: [
                "--redis", "redis://127.0.0.1:{}/0".format(redis.port),
                "--redis-password-file", self.write(PASSWORD),
                "--webhook-secret-file", self.write(HOOK_SECRET),
                "--api-key-file", self.write(API_KEY),
            ]
        )
        out = yield self.check(*started, master_too=True)
        self.assertNotIn("on the command line", out)

    @inlineCallbacks
    def test_secrets_on_the_command_line_stay_off_the_workers(self):
        """Secrets given on the master's command line still work, are warned
        about, and are on no worker's command line."""
        started = yield self.start(
            lambda redis: [
                "--redis", redis.url, "--webhook-secret", HOOK_SECRET, "--api-key", API_KEY,
            ]
        )
        out = yield self.check(*started, master_too=False)
        for flag in ("--webhook-secret", "--api-key", "--redis"):
            self.assertIn("{} puts a secret on the command line".format(flag), out)

    def kill_left_over(self, master):
        for pid in descendants(master):
            os.kill(pid, signal.SIGKILL)

    @inlineCallbacks
    def test_a_bad_secret_file_stops_twistd_with_the_flag(self):
        """twistd with an unreadable secret file exits at once with a usage
        error naming the flag and the path, and nothing of the file."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"do-not-print-me\xff")
        process = CollectingProcess()
        argv = [
            sys.executable, "-c", TWISTD, "-n", "--pidfile=", "broadcaster",
            "--webhook-secret-file", path,
        ]
        reactor.spawnProcess(process, sys.executable, argv, env=checkout_env())
        out, err, status = yield process.ended()
        self.assertNotEqual(status, 0)
        self.assertIn("--webhook-secret-file {!r} cannot be read".format(path), out + err)
        self.assertNotIn("do-not-print-me", out + err)
