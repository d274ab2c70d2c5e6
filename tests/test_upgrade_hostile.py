"""
The main port's WebSocket fast path (:mod:`broadcaster.http.upgrade`)
attacked over real sockets: a handshake sent in one write (the fast path)
and the same bytes sent in two writes (twisted.web's path) are answered
alike, hostile or not; refusals, connection limits, the open-handshake
timeout and TLS still hold on the fast path; and an honest client
connected meanwhile keeps receiving its messages.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import time
from typing import List, Tuple

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broadcaster.http import site
from broadcaster.protocols.origin import HostPolicy
from tests.support import (
    build_frame,
    connect_plain_clients,
    parse_frames,
    self_signed_certificate,
    start_server,
    wait_for,
)
from tests.test_admission import read_answer


def handshake(target: bytes = b"/", host: bytes = b"127.0.0.1", extra: bytes = b"", key=None) -> bytes:
    """A client's WebSocket handshake, with ``extra`` header lines."""
    key = key or base64.b64encode(os.urandom(16))
    return (
        b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


def _read_head(sock, deadline: float) -> bytes:
    """Read until the end of a response's head, a close, or ``deadline``."""
    return read_answer(sock, deadline, head_only=True)


def exchange(port: int, chunks: List[bytes], pause: float = 0.03, read_for: float = 3.0) -> bytes:
    """
    Send ``chunks`` on a plain socket, ``pause`` seconds apart (so that
    each is a read of its own), and return what the server answers up to
    the end of its response's head (blocking: run it in a thread).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n, chunk in enumerate(chunks):
            if n:
                time.sleep(pause)
            try:
                s.sendall(chunk)
            except OSError:
                break
        return _read_head(s, time.monotonic() + read_for)


def head_of(answer: bytes) -> Tuple[bytes, List[bytes]]:
    """A response's status line and its header names (lower case, sorted,
    ``Date`` left out)."""
    status, *lines = answer.split(b"\r\n\r\n")[0].split(b"\r\n")
    names = sorted(line.split(b":")[0].lower() for line in lines if line)
    return status, [name for name in names if name != b"date"]


class LoggedLines:
    """Every log line of the test, formatted."""

    def __init__(self, testcase) -> None:
        self.lines: List[str] = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event) -> None:
        text = formatEvent(event)
        if text:
            self.lines.append(text)

    def matching(self, *fragments: str) -> List[str]:
        return [line for line in self.lines if any(f in line for f in fragments)]


class HonestPairMixin:
    """Two honest clients that must keep hearing each other."""

    @inlineCallbacks
    def honest_pair(self, port: int):
        (self.ann, _), (self.bob, _) = yield connect_plain_clients(self, port, 2)
        self._said = 0

    @inlineCallbacks
    def assert_honest_chat_intact(self):
        """Bob hears what Ann says next (after anything announced meanwhile)."""
        self._said += 1
        text = "honest {}".format(self._said)
        self.ann.send_text(text)
        while True:
            heard = yield self.bob.next_text()
            if heard.endswith(text):
                return


class BothPathsAnswerAlikeTests(HonestPairMixin, TestCase):
    """
    The same bytes, as the fast path sees them (one write) and as
    twisted.web's path does (one byte, then the rest), get the same answer.
    """

    @inlineCallbacks
    def test_hostile_and_odd_handshakes_get_the_same_answer_on_both_paths(self):
        """Request-target bytes twisted.web refuses (beyond ASCII, control
        characters), more headers than it takes, Expect (its 100 Continue),
        Host tricks (case, trailing dot, port, IPv6, whitespace, latin-1,
        empty, a foreign name), another version, no or a bad key, a foreign
        Origin, a bad ?name=: the same status line and header names either
        way; the honest pair keeps chatting throughout."""
        service, port = yield start_server(self)
        yield self.honest_pair(port)
        many = b"".join(b"X-%d: 1\r\n" % n for n in range(600))
        cases = [
            handshake(),
            handshake(b"/?name=\xff"),
            handshake(b"/?name=\xe9t\xe9"),
            handshake(b"/?a\tb"),
            handshake(b"/?a\x00b"),
            handshake(b"/?a\x7fb"),
            handshake(b"/?a#b"),
            handshake(b"/?name=%00"),
            handshake(extra=many),
            handshake(extra=b"Expect: 100-continue\r\n"),
            handshake(host=b"LOCALHOST"),
            handshake(host=b"localhost."),
            handshake(host=b"localhost:1"),
            handshake(host=b"[::1]:80"),
            handshake(host=b"[::1]"),
            handshake(host=b"[::ffff:127.0.0.1]"),
            handshake(host=b" localhost\t"),
            handshake(host=b"localh\xf6st"),
            handshake(host=b"localhost:abc"),
            handshake(host=b""),
            handshake(host=b"evil.example"),
            handshake(host=b"127.0.0.1.evil.example"),
            handshake(extra=b"Origin: http://evil.example\r\n"),
            handshake(extra=b"X-Obs: \xff\xfe\r\n"),
            handshake().replace(b"Version: 13", b"Version: 12"),
            handshake().replace(b"Sec-WebSocket-Key", b"X-Key"),
            handshake(key=b"short"),
            handshake().replace(b"Upgrade: websocket", b"Upgrade: websocket, h2c"),
        ]
        for n, data in enumerate(cases):
            fast = yield deferToThread(exchange, port, [data])
            slow = yield deferToThread(exchange, port, [data[:1], data[1:]])
            self.assertTrue(fast and slow, data)
            self.assertEqual(head_of(fast), head_of(slow), data)
            if n % 7 == 0:
                yield self.assert_honest_chat_intact()
        yield self.assert_honest_chat_intact()

    @inlineCallbacks
    def test_the_fast_path_takes_only_what_twisted_web_would_take(self):
        """The handshakes twisted.web refuses with 400 (a target byte beyond
        ASCII, 600 headers) are refused in one write too, not opened; and
        an Expect header is answered 100 Continue then 101, as it was."""
        service, port = yield start_server(self)
        for data in (handshake(b"/?name=\xff"), handshake(extra=b"".join(
            b"X-%d: 1\r\n" % n for n in range(600)
        ))):
            answer = yield deferToThread(exchange, port, [data])
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
        answer = yield deferToThread(exchange, port, [handshake(extra=b"Expect: 100-continue\r\n")])
        self.assertTrue(answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), answer)


class ExtraBytesTests(HonestPairMixin, TestCase):
    """What follows a handshake in the same write."""

    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self)
        yield self.honest_pair(self.port)

    def _open(self, data: bytes):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(data)
        return sock, _read_head(sock, time.monotonic() + 5)

    @inlineCallbacks
    def test_a_frame_in_the_handshake_s_write(self):
        """A handshake followed by a frame in one write (twisted.web's path)
        still opens, the connection then works (its next message reaches
        the others), and the honest pair is undisturbed."""
        sock, answer = yield deferToThread(
            self._open, handshake() + build_frame(1, b"too early")
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer)
        yield self.bob.next_text()  # the newcomer's announcement
        sock.sendall(build_frame(1, b"in time"))
        while True:
            heard = yield self.bob.next_text()
            if heard.endswith("in time"):
                break
        yield self.assert_honest_chat_intact()

    @inlineCallbacks
    def test_a_pipelined_request_is_not_answered(self):
        """A second request after the handshake, in the same write, is not
        answered as HTTP: one response only, the 101, and the connection
        is a WebSocket one."""

        def pipelined():
            sock, answer = self._open(
                handshake() + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            sock.settimeout(0.3)
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            except socket.timeout:
                pass
            return answer

        answer = yield deferToThread(pipelined)
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer)
        self.assertEqual(answer.count(b"HTTP/1.1 "), 1, answer)
        frames, _ = parse_frames(answer.split(b"\r\n\r\n", 1)[1])
        self.assertIn(b"connected", frames[0].payload)
        yield self.assert_honest_chat_intact()


class RefusalsOnTheFastPathTests(HonestPairMixin, TestCase):
    """Refusals, limits and timeouts a handed-over handshake still meets."""

    @inlineCallbacks
    def test_a_foreign_origin_is_refused_and_logged_in_order(self):
        """In one write, a foreign Origin is answered 403 and logged
        [REFUSED] then [HANDSHAKE] ... not opened, with no [CONNECT]."""
        logged = LoggedLines(self)
        service, port = yield start_server(self)
        yield self.honest_pair(port)
        del logged.lines[:]
        answer = yield deferToThread(
            exchange, port, [handshake(b"/?x=1", extra=b"Origin: http://evil.example\r\n")]
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
        yield wait_for(lambda: logged.matching("[HANDSHAKE]"), what="the log line")
        lines = logged.matching("[REFUSED]", "[HANDSHAKE]", "[CONNECT]")
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("[REFUSED]", lines[0])
        self.assertIn("evil.example", lines[0])
        self.assertIn("[HANDSHAKE]", lines[1])
        self.assertIn("origin=http://evil.example", lines[1])
        self.assertTrue(lines[1].endswith("not opened"), lines[1])
        yield self.assert_honest_chat_intact()

    @inlineCallbacks
    def test_max_connections_hold_on_the_fast_path(self):
        """With --max-connections 3 and the honest pair in: handshakes
        refused on the fast path (foreign Origin, bad ?name=, bad version)
        give their place back, an opened one keeps it (the next is answered
        503), and closing it frees it again."""
        service, port = yield start_server(self, ["--max-connections", "3"])
        yield self.honest_pair(port)
        refused = (
            handshake(extra=b"Origin: http://evil.example\r\n"),
            handshake(b"/?name=%00"),
            handshake().replace(b"Version: 13", b"Version: 7"),
        )
        for data in refused * 3:
            answer = yield deferToThread(exchange, port, [data])
            self.assertRegex(answer[:12], b"HTTP/1.1 4")
        yield wait_for(lambda: service.admission.connections == 2, what="places given back")
        yield self.assert_last_place_held(service, port)
        yield self.assert_honest_chat_intact()

    @inlineCallbacks
    def test_max_connections_per_ip_hold_on_the_fast_path(self):
        """With --max-connections-per-ip 1, a second connection from the
        same address is answered 503 while a fast-path WebSocket holds the
        one place, and admitted once it has gone."""
        service, port = yield start_server(self, ["--max-connections-per-ip", "1"])
        yield self.assert_last_place_held(service, port)

    @inlineCallbacks
    def assert_last_place_held(self, service, port: int):
        """
        A fast-path WebSocket opened in the last place under the limits
        holds it (the next handshake is answered 503) until it closes;
        then the next is admitted.
        """
        before = service.admission.connections
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(handshake())
        answer = yield deferToThread(_read_head, sock, time.monotonic() + 5)
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer)
        answer = yield deferToThread(exchange, port, [handshake()])
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        sock.close()
        yield wait_for(lambda: service.admission.connections == before, what="the place freed")
        answer = yield deferToThread(exchange, port, [handshake()])
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer)

    @inlineCallbacks
    def test_the_open_handshake_timeout_ends_a_hanging_sign_in(self):
        """A fast-path handshake whose sign-in never ends (an authenticator
        that never answers, past its own --auth-timeout) is dropped after
        --open-handshake-timeout (2 s), not before (Autobahn's batched
        timer, which rounded the deadline down to a whole second, is not
        used for it), unopened."""
        from twisted.internet.defer import Deferred

        from tests.http.test_auth import AuthService
        from tests.http.test_webhooks import serve

        auth = AuthService(code=None)
        url = serve(self, auth).url + "/check"
        service, port = yield start_server(
            self, ["--auth-url", url, "--auth-timeout", "0.5", "--open-handshake-timeout", "2"]
        )
        asked = []

        def never(**kwargs):
            asked.append(kwargs)
            return Deferred()

        self.patch(service.websocket_factory.authenticator, "authenticate", never)

        def hang():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                started = time.monotonic()
                s.sendall(handshake())
                answer = _read_head(s, started + 10)
                if not answer:
                    try:
                        answer = s.recv(1)
                    except OSError:
                        pass
                return answer, time.monotonic() - started

        answer, took = yield deferToThread(hang)
        self.assertNotIn(b" 101 ", answer)
        self.assertEqual(len(asked), 1)
        self.assertLess(took, 5.0)
        self.assertGreater(took, 1.95)


class TLSTests(TestCase):
    """The fast path over ``--port ssl:...``."""

    @inlineCallbacks
    def test_a_handshake_in_one_tls_record_opens_and_chats(self):
        """Over TLS, handshakes sent whole take the fast path (no twisted.web
        request made); a split one takes twisted.web's; all three clients
        open and hear each other."""
        directory = self.mktemp()
        os.makedirs(directory)
        key, cert = self_signed_certificate(directory)
        requests = []
        original = site.BoundedRequest.__init__

        def counted(request, *args, **kwargs):
            requests.append(request)
            original(request, *args, **kwargs)

        self.patch(site.BoundedRequest, "__init__", counted)
        service, port = yield start_server(
            self,
            ["--port", "ssl:0:interface=127.0.0.1:privateKey={}:certKey={}".format(key, cert)],
        )

        def talk():
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            clients = []
            try:
                for split in (False, False, True):
                    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock = context.wrap_socket(raw)
                    clients.append(sock)
                    data = handshake()
                    if split:
                        sock.sendall(data[:1])
                        time.sleep(0.05)
                        sock.sendall(data[1:])
                    else:
                        sock.sendall(data)
                    answer = _read_head(sock, time.monotonic() + 5)
                    if not answer.startswith(b"HTTP/1.1 101 "):
                        return "not opened: {!r}".format(answer)
                clients[0].sendall(build_frame(1, b"over tls"))
                heard = {}
                for n in (1, 2):
                    received = b""
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and b"over tls" not in received:
                        received += clients[n].recv(65536)
                    heard[n] = b"over tls" in received
                return heard
            finally:
                for sock in clients:
                    sock.close()

        result = yield deferToThread(talk)
        self.assertEqual(result, {1: True, 2: True})
        self.assertEqual(len(requests), 1)


class HostVerdictCacheTests(SynchronousTestCase):
    """HostPolicy's remembered verdicts, under many distinct Host headers."""

    def test_verdicts_stay_right_and_bounded(self):
        """Thousands of distinct headers, foreign and allowed interleaved,
        keep at most REMEMBERED verdicts, and every verdict is the one a
        fresh policy gives."""
        policy = HostPolicy(["chat.example"], loopback=True)
        fresh = HostPolicy(["chat.example"], loopback=True)
        for n in range(3 * HostPolicy.REMEMBERED):
            for header in (
                "evil{}.example".format(n),
                "localhost:{}".format(n),
                "chat.example:{}".format(n),
                "127.0.0.{}".format(n % 256),
                "[::1]:{}".format(n),
            ):
                self.assertEqual(policy.permits(header), fresh._judge(header), header)
                self.assertLessEqual(policy._verdict.cache_info().currsize, HostPolicy.REMEMBERED)
        self.assertFalse(policy.permits("evil0.example"))
        self.assertTrue(policy.permits("localhost"))


class HostFloodTests(HonestPairMixin, TestCase):
    """Many distinct Host headers over real sockets."""

    @inlineCallbacks
    def test_a_flood_of_host_names_changes_no_verdict(self):
        """300 handshakes, each naming a foreign host of its own, are all
        answered 403; an allowed name still opens, a foreign one is still
        refused, and the honest pair keeps chatting."""
        service, port = yield start_server(self)
        yield self.honest_pair(port)

        def flood():
            answers = set()
            for n in range(300):
                answer = exchange(port, [handshake(host=b"evil%d.example" % n)])
                answers.add(answer.split(b"\r\n")[0])
            return answers

        answers = yield deferToThread(flood)
        self.assertEqual(answers, {b"HTTP/1.1 403 Forbidden"})
        answer = yield deferToThread(exchange, port, [handshake(host=b"localhost:1")])
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer)
        answer = yield deferToThread(exchange, port, [handshake(host=b"evil0.example")])
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
        yield self.assert_honest_chat_intact()
