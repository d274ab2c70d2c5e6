"""
Tests for :mod:`broadcaster.service.secrets`: secrets from files and the
environment, the warnings for those on the command line, and a real
``twistd broadcaster`` refusing a bad secret file.
"""

import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from broadcaster.redis.address import RedisAddress
from broadcaster.service.secrets import MAX_SECRET_FILE, REDIS_PASSWORD, read_secret_file
from broadcaster.service.tap import Options, makeService
from broadcaster.service.workers import TWISTD
from tests.support import CollectingProcess, checkout_env

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
        """A file its reader may not open is refused with the flag and why."""
        if os.geteuid() == 0:
            raise SkipTest("root reads files whatever their mode")
        path = self.write(HOOK_SECRET, mode=0)
        self.assertRefused(["--webhook-secret-file", path], "--webhook-secret-file", "Permission denied")

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


class EndToEndTests(TestCase):
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
