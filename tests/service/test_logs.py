"""
Tests for :mod:`broadcaster.service.logs`: what clients send can neither
forge log lines nor reach a terminal raw, and no credential is written,
whoever logged it.
"""

import io

from twisted.logger import Logger, LogPublisher, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.service import logs
from broadcaster.service.options import Options


class Written(list):
    """An observer that keeps the events it is passed, formatted."""

    def __call__(self, event):
        self.append(event)

    def lines(self):
        return [formatEvent(event) for event in self]


class SanitisingTests(SynchronousTestCase):
    def setUp(self):
        self.written = Written()
        self.log = Logger(
            observer=LogPublisher(logs.SanitisingObserver(self.written)), namespace="test"
        )

    def test_control_characters_are_escaped(self):
        """ESC, backspace, CR, LF, NUL, DEL, C1 controls, line separators
        and bidi overrides in a field come out as escapes; tab stays."""
        self.log.warn(
            "[IMAGE URL] {client}: image from {host} refused",
            client="w-1",
            host="evil\x1b]0;pwned\x07.example\x08\x08\r\nFAKE LINE\x00\x7f\x9b\u2028\u202etab\there",
        )
        (line,) = self.written.lines()
        self.assertEqual(
            line,
            "[IMAGE URL] w-1: image from evil\\x1b]0;pwned\\x07.example\\x08\\x08\\x0d\\x0a"
            "FAKE LINE\\x00\\x7f\\x9b\\u2028\\u202etab\there refused",
        )

    def test_the_format_keeps_its_line_breaks(self):
        """The server's own multi-line messages stay multi-line; the field
        inside is escaped."""
        self.log.debug("received:\n\n{data}\n", data="GET /\r\nHost: x")
        self.assertEqual(self.written.lines(), ["received:\n\nGET /\\x0d\\x0aHost: x\n"])

    def test_credentials_are_redacted(self):
        """Header values, bearer tokens, credential query parameters and
        URL passwords are replaced, wherever they appear in a field."""
        cases = {
            "Authorization: Bearer abc.def.ghi": "Authorization: <redacted>",
            "{'authorization': 'Bearer abc', 'host': 'x'}": "{'authorization': '<redacted>', 'host': 'x'}",
            "Cookie: session=s3cr3t; other=1": "Cookie: <redacted>",
            "GET /?name=ann&token=eyJhbGciOi.x.y&since=e:1 HTTP/1.1": "GET /?name=ann&token=<redacted>&since=e:1 HTTP/1.1",
            "/api?api_key=k1&password=p": "/api?api_key=<redacted>&password=<redacted>",
            "redis://:hunter2@127.0.0.1:6379/0": "redis://:***@127.0.0.1:6379/0",
            "sent bearer xyz123 along": "sent bearer <redacted> along",
        }
        for raw in cases:
            self.log.info("{what}", what=raw)
        self.assertEqual(self.written.lines(), list(cases.values()))

    def test_bytes_and_nested_fields(self):
        """Bytes, tuples, lists and dicts are cleaned too (legacy log.msg
        events carry their text in a tuple)."""
        self.log.info(
            "{a} {b} {c}", a=b"x\x1by", b=("Cookie: c=1",), c={"k": "\x1b[2J"}
        )
        event = self.written[0]
        self.assertEqual(event["a"], "x\\x1by")
        self.assertEqual(event["b"], ("Cookie: <redacted>",))
        self.assertEqual(event["c"], {"k": "\\x1b[2J"})
        self.assertEqual(event["log_namespace"], "test")


class ObserverChoiceTests(SynchronousTestCase):
    def parse(self, *args, **parent):
        parent = {"logfile": None, "nodaemon": True, "logger": None, "syslog": False, **parent}
        options = Options()
        options.parent = parent
        self.addCleanup(logs.use_target, "-")
        options.parseOptions(list(args))
        return parent

    def test_text_by_default(self):
        """Without --log-format, twistd logs through the sanitising text
        observer."""
        self.assertEqual(self.parse()["logger"], "broadcaster.service.logs.text_observer")

    def test_json(self):
        self.assertEqual(
            self.parse("--log-format", "json")["logger"],
            "broadcaster.service.logs.json_observer",
        )

    def test_the_operator_s_choice_stays(self):
        """--syslog, or a --logger of the operator's own, is left alone."""
        self.assertEqual(self.parse(syslog=True)["logger"], None)
        mine = object()
        self.assertIs(self.parse(logger=mine)["logger"], mine)

    def test_text_lines_to_a_file(self):
        """The text observer writes twistd's usual lines, escaped."""
        path = self.mktemp()
        logs.use_target(path)
        self.addCleanup(logs.use_target, "-")
        observer = logs.text_observer()
        Logger(observer=LogPublisher(observer)).info("{x}", x="a\x1bb")
        logs.file_observer(observer)._outFile.flush()
        with io.open(path, encoding="utf-8") as f:
            self.assertTrue(f.read().rstrip("\n").endswith("a\\x1bb"))

    def test_bad_log_format(self):
        self.assertRaises(usage.UsageError, self.parse, "--log-format", "xml")


class ClassicTextTests(SynchronousTestCase):
    """The text observer writes exactly the lines Twisted's classic
    format would, the usual ones without its slow formatter."""

    def test_the_same_lines_as_twisteds(self):
        from twisted.logger import LogLevel, formatEventAsClassicLogText
        from twisted.python.failure import Failure

        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        when = 1796431768.9
        events = [
            dict(log_format="[X] {a} {b!r} {c:.2f}", a="x", b="y", c=1.5),
            dict(log_format="two\nlines {a}", a="x"),
            dict(log_format="{missing} field"),
            dict(log_format="a call {a.bit_length()}", a=5),
            dict(log_format="brackets ({a}) are not calls", a="x"),
            dict(log_format="attribute {a.real} and item {b[0]}", a=3, b=["first"]),
            dict(log_format=""),
            dict(log_format="failed", log_failure=failure),
            dict(log_format="legacy", log_system="HTTPChannel,3,127.0.0.1"),
            dict(log_format=b"bytes {a}", a=1),
            dict(a="no format"),
        ]
        for event in events:
            event.update(log_time=when, log_level=LogLevel.warn, log_namespace="n.s")
            self.assertEqual(logs.classic_text(event), formatEventAsClassicLogText(event), event)
        # Without a time or a level, as Twisted writes them.
        for event in (dict(log_format="hi"), dict(log_format="hi", log_time=when)):
            self.assertEqual(logs.classic_text(event), formatEventAsClassicLogText(event))

    def test_connection_lines_are_made_the_fast_way(self):
        """
        The lines every connection logs never reach Twisted's formatter
        (four times slower; a sixth of a connection's cost in a storm),
        brackets in their text notwithstanding.
        """
        from twisted.logger import formatEventAsClassicLogText

        from broadcaster.protocols.connection import log_connect, log_disconnect

        events = []
        log = Logger(observer=events.append, namespace="n.s")
        log_connect(log, "c-1", "tcp4:127.0.0.1:1", "plain", 1)
        log_disconnect(log, "c-1", 1.0, 0, 1000, "", True)
        expected = [formatEventAsClassicLogText(event) for event in events]
        self.patch(logs, "formatEventAsClassicLogText", None)
        self.assertEqual([logs.classic_text(event) for event in events], expected)
        self.assertIn("(plain)", expected[0])
