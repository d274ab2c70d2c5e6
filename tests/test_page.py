"""
The chat page in a real browser: Debian's chromium, headless, driven through
selenium against a real server on a loopback port, with ``websocket-client``
scripts as the other people in the room.

Selenium and websocket-client block, so every call to them runs in a thread
(:func:`deferToThread`) while the reactor goes on serving the page and its
WebSocket.  Conditions in the page are awaited with ``WebDriverWait`` and
conditions in the server with :func:`tests.support.wait_for`: no sleeps.

Without chromium and chromedriver these tests are skipped, unless the
environment variable ``CI`` is set: there, a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Callable, List, Optional

import websocket
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet import reactor, tcp
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import FailTest, SkipTest, TestCase

from tests.support import start_server, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: Seconds to wait for anything the page or a script client should do.
WAIT = 10.0

# The machine running the tests may have no network at all: keep chromium
# from reaching out (component updates, sync, QUIC probes), which otherwise
# stalls its start-up or fills its log with errors.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1024,768",
]

# Reads the page's state in one script run, so that an element re-rendered
# between two WebDriver calls (the member list is rebuilt on every change)
# cannot go stale under the test.
_READ_MESSAGES = """
return Array.from(document.querySelectorAll('#messages .message'), (entry) => ({
  from: entry.dataset.from,
  text: entry.querySelector('.text').textContent,
  mine: entry.classList.contains('mine'),
}));
"""
_READ_MEMBERS = """
return Array.from(document.querySelectorAll('#members li'), (li) => li.dataset.id);
"""
_READ_LOG = """
return Array.from(document.querySelectorAll('#messages > li'),
                  (entry) => entry.innerText.replace(/\\s+/g, ' ').trim());
"""
_READ_STATUS = """
const status = document.getElementById('status');
return {state: status.dataset.state, id: status.dataset.id || null, text: status.textContent};
"""


def missing_browser() -> Optional[str]:
    """
    :return: why the browser tests cannot run here, or ``None`` if they can.
    """
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return "{} is missing (install Debian's chromium and chromium-driver)".format(path)
    return None


class Page:
    """
    The chat page in a headless chromium, with the blocking calls the tests
    make on it.  Every method blocks: call them with :func:`deferToThread`.
    """

    def __init__(self, driver: webdriver.Chrome, scratch: str) -> None:
        self.driver = driver
        self._scratch = scratch

    @classmethod
    def start(cls) -> "Page":
        """
        Start chromium with a fresh profile.

        :raise FailTest: if it does not start, with chromedriver's log.
        """
        scratch = tempfile.mkdtemp(prefix="broadcaster-chromium-")
        log_path = os.path.join(scratch, "chromedriver.log")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in CHROMIUM_ARGS:
            options.add_argument(arg)
        options.add_argument("--user-data-dir={}".format(os.path.join(scratch, "profile")))
        # Console messages, so that CSP violations and script errors are seen.
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # An explicit driver path also keeps selenium-manager (which would
        # try to download a driver) out of the way.
        service = Service(executable_path=CHROMEDRIVER, log_output=log_path)
        try:
            driver = webdriver.Chrome(service=service, options=options)
        except WebDriverException as e:
            try:
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    log = f.read()[-4000:]
            except OSError:
                log = "(no chromedriver log)"
            shutil.rmtree(scratch, ignore_errors=True)
            raise FailTest(
                "chromium did not start: {}\nchromedriver log (tail):\n{}".format(e.msg, log)
            ) from None
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        return cls(driver, scratch)

    def quit(self) -> None:
        """
        Close the browser and remove its profile.
        """
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def wait(self, condition: Callable[[webdriver.Chrome], object], what: str) -> object:
        """
        Wait until ``condition(driver)`` is true and return its value.

        :raise FailTest: after :data:`WAIT` seconds, saying what was
            awaited and what the page showed.
        """
        try:
            return WebDriverWait(self.driver, WAIT).until(condition)
        except TimeoutException:
            raise FailTest(
                "timed out after {}s waiting for {}.\nstatus: {}\nmembers: {}\nlog:\n  {}".format(
                    WAIT,
                    what,
                    self.status(),
                    self.members(),
                    "\n  ".join(self.log_lines()) or "(empty)",
                )
            ) from None

    def open(self, url: str) -> str:
        """
        Load the page and wait until it is connected.

        :return: the page's id, as its header shows it.
        """
        self.driver.get(url)
        return self.wait_connected()

    def wait_connected(self, other_than: Optional[str] = None) -> str:
        """
        Wait until the header says the page is connected (with an id other
        than ``other_than``).

        :return: the id the header shows.
        """

        def connected(driver):
            status = self.status()
            if status["state"] == "connected" and status["id"] not in (None, other_than):
                return status["id"]
            return False

        what = "the page to be connected"
        if other_than is not None:
            what += " with an id other than {}".format(other_than)
        return self.wait(connected, what)

    def status(self) -> dict:
        """
        :return: the header's state, id and text.
        """
        return self.driver.execute_script(_READ_STATUS)

    def members(self) -> List[str]:
        """
        :return: the ids in the member list, in order.
        """
        return self.driver.execute_script(_READ_MEMBERS)

    def messages(self) -> List[dict]:
        """
        :return: the chat messages in the log, each ``{from, text, mine}``.
        """
        return self.driver.execute_script(_READ_MESSAGES)

    def log_lines(self) -> List[str]:
        """
        :return: every log entry's text as one line, for failure messages.
        """
        return self.driver.execute_script(_READ_LOG)

    def wait_for_message(self, sender: str, text: Optional[str] = None) -> dict:
        """
        Wait until the log shows ``text`` (or any message) from ``sender``.

        :return: that message, ``{from, text, mine}``.
        """

        def shown(driver):
            for message in self.messages():
                if message["from"] == sender and text in (None, message["text"]):
                    return message
            return False

        if text is None:
            what = "a message from {} in #messages".format(sender)
        else:
            what = "message {!r} from {} in #messages".format(text, sender)
        return self.wait(shown, what)

    def wait_for_members(self, expected: List[str]) -> None:
        """
        Wait until the member list holds exactly the ids in ``expected``.
        """
        self.wait(
            lambda driver: sorted(self.members()) == sorted(expected),
            "#members to list exactly {}".format(sorted(expected)),
        )

    def type_text(self, text: str) -> None:
        """
        Type ``text`` into the message box (without sending it).
        """
        self.driver.find_element(By.ID, "text").send_keys(text)

    def press_enter(self) -> None:
        """
        Press Enter in the message box.
        """
        self.driver.find_element(By.ID, "text").send_keys(Keys.ENTER)

    def click_send(self) -> None:
        """
        Click the Send button.
        """
        self.driver.find_element(By.ID, "send").click()

    def console_errors(self) -> List[str]:
        """
        :return: the browser console's errors since the last call (script
            errors, failed requests, Content-Security-Policy violations).
        """
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if entry["level"] == "SEVERE"
        ]


class ScriptClient:
    """
    A ``websocket-client`` connection in plain mode: the server's
    ``<id> connected`` announcements and other people's text, unchanged.
    Every method blocks: call them with :func:`deferToThread`.

    :ivar id: the id the server gave this client.
    """

    def __init__(self, url: str) -> None:
        self._ws = websocket.create_connection(url, timeout=WAIT)
        # The hub announces every newcomer to everyone, the newcomer first.
        first = self._ws.recv()
        if not first.endswith(" connected"):
            raise FailTest("expected '<id> connected' first, got {!r}".format(first))
        self.id = first[: -len(" connected")]

    def send(self, text: str) -> None:
        """
        Send a text message.
        """
        self._ws.send(text)

    def receive_until(self, wanted: str) -> List[str]:
        """
        Read messages until ``wanted`` arrives.

        :return: the messages read before it.
        :raise FailTest: if it has not arrived after :data:`WAIT` seconds.
        """
        before: List[str] = []
        deadline = time.monotonic() + WAIT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._ws.settimeout(remaining)
            try:
                message = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                break
            if message == wanted:
                return before
            before.append(message)
        raise FailTest(
            "script client {} did not receive {!r} within {}s; it received {!r}".format(
                self.id, wanted, WAIT, before
            )
        )

    def close(self) -> None:
        """
        Close the connection with a WebSocket close handshake.
        """
        self._ws.close(timeout=WAIT)


def _server_connections() -> list:
    return [
        selectable
        for selectable in reactor.getReaders() + reactor.getWriters()
        if isinstance(selectable, tcp.Server)
    ]


class ChatPageTests(TestCase):
    """
    The chat page, served by a real server and shown by headless chromium.
    """

    @inlineCallbacks
    def setUp(self):
        missing = missing_browser()
        if missing is not None:
            if os.environ.get("CI"):
                self.fail("{}; CI is set, so the browser tests must run".format(missing))
            raise SkipTest(missing)
        self.service, port = yield start_server(self)
        self.url = "http://127.0.0.1:{}/".format(port)
        self.ws_url = "ws://127.0.0.1:{}/".format(port)
        # Cleanups run last-added first: the browser and the script clients
        # close, then the server must have seen every connection go (or the
        # reactor is left dirty), then the server stops.
        self.addCleanup(
            wait_for,
            lambda: not _server_connections(),
            what="the server to see every browser and script connection close",
        )
        self.page = yield deferToThread(Page.start)
        self.addCleanup(deferToThread, self.page.quit)

    @inlineCallbacks
    def script_client(self):
        """
        Connect a plain-mode ``websocket-client`` script, closed at cleanup.

        :return: a Deferred firing with its :class:`ScriptClient`.
        """
        client = yield deferToThread(ScriptClient, self.ws_url)
        self.addCleanup(deferToThread, client.close)
        return client

    @inlineCallbacks
    def test_message_reaches_script_client(self):
        """
        Text sent from the page reaches a plain-mode script client unchanged,
        an empty box sends nothing, and the page shows its own message as its.
        """
        client = yield self.script_client()
        page_id = yield deferToThread(self.page.open, self.url)

        yield deferToThread(self.page.click_send)  # empty: ignored
        yield deferToThread(self.page.type_text, "hello from the browser")
        yield deferToThread(self.page.press_enter)

        before = yield deferToThread(client.receive_until, "hello from the browser")
        self.assertEqual(before, ["{} connected".format(page_id)])
        echo = yield deferToThread(self.page.wait_for_message, page_id, "hello from the browser")
        self.assertTrue(echo["mine"], "the page's own message is not marked as its own")
        messages = yield deferToThread(self.page.messages)
        self.assertEqual(len(messages), 1, "the page added a local copy: {}".format(messages))

    @inlineCallbacks
    def test_script_message_shown(self):
        """
        A script client's message appears in the page's log under its id.
        """
        yield deferToThread(self.page.open, self.url)
        client = yield self.script_client()

        yield deferToThread(client.send, "hello from a script")

        message = yield deferToThread(self.page.wait_for_message, client.id, "hello from a script")
        self.assertFalse(message["mine"], "another client's message is marked as the page's own")

    @inlineCallbacks
    def test_presence(self):
        """
        The member list shows the page and a second client, and drops the
        client when it disconnects.
        """
        page_id = yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.wait_for_members, [page_id])

        client = yield self.script_client()
        yield deferToThread(self.page.wait_for_members, [page_id, client.id])

        yield deferToThread(client.close)
        yield deferToThread(self.page.wait_for_members, [page_id])

    @inlineCallbacks
    def test_html_shown_as_text(self):
        """
        Markup in a message is shown as text: no element is created and no
        script runs.
        """
        attack = '<img src=x onerror="window.__pwned=1">'
        yield deferToThread(self.page.open, self.url)
        client = yield self.script_client()

        yield deferToThread(client.send, attack)

        message = yield deferToThread(self.page.wait_for_message, client.id)
        self.assertEqual(message["text"], attack, "the message is not shown as the text sent")
        # The page's CSP would block the inline onerror even if the markup
        # were parsed, so the absence of the <img> is the real proof.
        images = yield deferToThread(
            self.page.driver.find_elements, By.CSS_SELECTOR, "#messages img"
        )
        self.assertEqual(images, [], "the message's markup was turned into elements")
        pwned = yield deferToThread(
            self.page.driver.execute_script, "return typeof window.__pwned;"
        )
        self.assertEqual(pwned, "undefined", "the message's markup ran a script")

    @inlineCallbacks
    def test_reconnects(self):
        """
        When the server drops the page's connection, the page reconnects by
        itself and comes back with a new id.
        """
        old_id = yield deferToThread(self.page.open, self.url)
        # The hub offers no public lookup of a member by id; its dict is the
        # only way to reach the page's protocol from here.
        protocol = self.service.hub.member(old_id)

        protocol.transport.abortConnection()

        new_id = yield deferToThread(self.page.wait_connected, old_id)
        yield wait_for(
            lambda: old_id not in self.service.hub and new_id in self.service.hub,
            what="the hub to swap {} for {}".format(old_id, new_id),
        )
        yield deferToThread(self.page.wait_for_members, [new_id])
        log = yield deferToThread(self.page.log_lines)
        self.assertTrue(
            any("Disconnected" in line for line in log),
            "no disconnect notice in the log: {}".format(log),
        )
        self.assertTrue(
            any("Reconnected as {}".format(new_id) in line for line in log),
            "no reconnect notice in the log: {}".format(log),
        )

    @inlineCallbacks
    def test_no_console_errors(self):
        """
        Loading the page (with a query string, passed on to the handshake),
        connecting and chatting log no console errors, so nothing breaks its
        Content-Security-Policy.
        """
        page_id = yield deferToThread(self.page.open, self.url + "?name=ann")
        yield deferToThread(self.page.type_text, "anyone there?")
        yield deferToThread(self.page.click_send)
        yield deferToThread(self.page.wait_for_message, page_id, "anyone there?")

        errors = yield deferToThread(self.page.console_errors)
        self.assertEqual(errors, [], "the browser console reported errors")
