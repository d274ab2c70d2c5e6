"""
The chat page in a real browser: Debian's chromium, headless, driven through
selenium against a real server on a loopback port, with scripts as the other
people in the room: ``websocket-client`` in plain mode, and Autobahn clients
in JSON mode (:func:`tests.test_rooms.join_chat`) where rooms, names and
recovery are concerned.  Connections are cut on the server's side
(``abortConnection``), as a network failure would.

Selenium and websocket-client block, so every call to them runs in a thread
(:func:`deferToThread`) while the reactor goes on serving the page and its
WebSocket.  Conditions in the page are awaited with ``WebDriverWait`` and
conditions in the server with :func:`tests.support.wait_for`: no sleeps.

Without chromium and chromedriver these tests are skipped, unless the
environment variable ``CI`` is set: there, a missing browser is a failure.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import time
from typing import Callable, List, Optional

import websocket
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import FailTest, SkipTest, TestCase

from broadcaster.core.events import TextMessage
from tests.support import (
    FrameClient,
    close_client,
    connect_client,
    connect_raw,
    port_of,
    start_server,
    wait_for,
)
from tests.test_bounds import fill_lobby
from tests.test_rooms import join_chat, of_type, read_until

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
  name: entry.querySelector('.from').textContent,
  text: entry.querySelector('.text').textContent,
  mine: entry.classList.contains('mine'),
}));
"""
_READ_MEMBERS = """
return Array.from(document.querySelectorAll('#members li'), (li) => li.dataset.id);
"""
_READ_MEMBER_NAMES = """
return Object.fromEntries(Array.from(
  document.querySelectorAll('#members li'),
  (li) => [li.dataset.id, li.querySelector('.name').textContent],
));
"""
_READ_ROOMS = """
return Array.from(document.querySelectorAll('#rooms li[data-room]'), (li) => {
  const badge = li.querySelector('.badge');
  return {
    room: li.dataset.room,
    active: li.classList.contains('active'),
    state: li.dataset.state || null,
    unread: badge && !badge.hidden ? badge.textContent : '',
  };
});
"""
_READ_BINARIES = """
return Array.from(document.querySelectorAll('#messages .binary'), (entry) => ({
  from: entry.dataset.from,
  text: entry.querySelector('.text').textContent,
  images: entry.querySelectorAll('img').length,
  download: entry.querySelector('.download') !== null,
}));
"""
_READ_LOG = """
return Array.from(document.querySelectorAll('#messages > li'),
                  (entry) => entry.innerText.replace(/\\s+/g, ' ').trim());
"""
# The log's entries by kind, for where history and the divider stand.
_READ_ENTRIES = """
return Array.from(document.querySelectorAll('#messages > li'), (entry) => ({
  kind: ['message', 'divider', 'history-marker', 'notice'].find(
    (kind) => entry.classList.contains(kind)) || 'other',
  text: entry.querySelector('.text') ? entry.querySelector('.text').textContent
                                     : entry.textContent.replace(/\\s+/g, ' ').trim(),
}));
"""
# The top of the log on view: its message, or its button's label.
_READ_MARKER = """
const marker = document.querySelector('#messages > .history-marker');
if (!marker || marker.hidden) return null;
const button = marker.querySelector('.load-older');
return button.hidden ? marker.querySelector('.marker-text').textContent : button.textContent;
"""
# Scrolls the log to its top, as a reader would, and says where its first
# message stood on screen (relative to the log) just before the page could react.
_SCROLL_TO_TOP = """
const log = document.getElementById('messages');
log.scrollTop = 0;
const first = log.querySelector('.message');
return [first.querySelector('.text').textContent,
        first.getBoundingClientRect().top - log.getBoundingClientRect().top];
"""
_PLACE_OF = """
const log = document.getElementById('messages');
const found = Array.from(log.querySelectorAll('.message'))
  .find((entry) => entry.querySelector('.text').textContent === arguments[0]);
return found.getBoundingClientRect().top - log.getBoundingClientRect().top;
"""
# What has the keyboard's focus, and whether it shows.
_READ_FOCUS = """
const focused = document.activeElement;
const item = focused.closest('li[data-room]');
const style = getComputedStyle(focused);
return {
  id: focused.id || null,
  className: typeof focused.className === 'string' ? focused.className : '',
  room: item ? item.dataset.room : null,
  outline: style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) >= 1,
};
"""
# The pictures in the log on view: whose, and their size once decoded.
_READ_PICTURES = """
return Array.from(document.querySelectorAll('#messages .image'), (entry) => {
  const picture = entry.querySelector('img');
  const decoded = picture !== null && picture.complete && picture.naturalWidth > 0;
  return {
    from: entry.dataset.from,
    mine: entry.classList.contains('mine'),
    size: decoded ? [picture.naturalWidth, picture.naturalHeight] : null,
  };
});
"""
_READ_UPLOAD = """
const status = document.getElementById('upload-status');
const error = document.getElementById('upload-error');
const progress = document.getElementById('upload-progress');
const bytes = document.getElementById('upload-bytes');
return {
  state: status.dataset.state || null,
  status: status.textContent,
  progress: progress.hidden ? null : [progress.value, progress.max],
  bytes: bytes.hidden ? null : bytes.textContent,
  error: error.textContent,
  error_shown: error.getClientRects().length > 0,
};
"""
# Hands the page a file as the browser would for a paste or a drop: the
# event's DataTransfer holds it.  Says whether the page took it (cancelled
# the browser's own handling).
_HAND_OVER = """
const [how, selector, name, type, encoded] = arguments;
const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, {type}));
const target = document.querySelector(selector);
const init = {bubbles: true, cancelable: true};
if (how === 'paste') {
  target.focus();
  return !target.dispatchEvent(new ClipboardEvent('paste', {...init, clipboardData: transfer}));
}
target.dispatchEvent(new DragEvent('dragenter', {...init, dataTransfer: transfer}));
const over = !target.dispatchEvent(new DragEvent('dragover', {...init, dataTransfer: transfer}));
return over && !target.dispatchEvent(new DragEvent('drop', {...init, dataTransfer: transfer}));
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
        #: Where the browser saves what the page offers for download.
        self.downloads = self.downloads_in(scratch)

    @staticmethod
    def downloads_in(scratch: str) -> str:
        """
        :return: the downloads folder of a browser whose scratch folder is ``scratch``.
        """
        return os.path.join(scratch, "downloads")

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
        # Downloads land in the scratch folder (removed with it), unasked.
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": cls.downloads_in(scratch),
                "download.prompt_for_download": False,
            },
        )
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
                "timed out after {}s waiting for {}.\n{}".format(WAIT, what, self.describe())
            ) from None

    def describe(self) -> str:
        """
        :return: what the page shows, for a failure message.
        """
        return "status: {}\nrooms: {}\nmembers: {}\nlog:\n  {}".format(
            self.status(),
            self.rooms(),
            self.members(),
            "\n  ".join(self.log_lines()) or "(empty)",
        )

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

    def binaries(self) -> List[dict]:
        """
        :return: the binary messages in the log, each ``{from, text,
            images, download}``: how many ``<img>`` the entry holds, and
            whether it offers the bytes for download.
        """
        return self.driver.execute_script(_READ_BINARIES)

    def downloaded(self) -> dict:
        """
        :return: the files the browser has finished downloading, ``{name: bytes}``.
        """
        found = {}
        if not os.path.isdir(self.downloads):
            return found
        names = os.listdir(self.downloads)
        # Chromium writes to a .crdownload file and renames it when done;
        # meanwhile it holds the final name with an empty file of that name.
        if any(name.endswith(".crdownload") for name in names):
            return found
        for name in names:
            with open(os.path.join(self.downloads, name), "rb") as f:
                found[name] = f.read()
        return found

    def member_names(self) -> dict:
        """
        :return: the member list as ``{id: name shown}``.
        """
        return self.driver.execute_script(_READ_MEMBER_NAMES)

    def texts(self) -> List[str]:
        """
        :return: the text of every chat message in the log, in order.
        """
        return [message["text"] for message in self.messages()]

    def rooms(self) -> List[dict]:
        """
        :return: the room list, each ``{room, active, state, unread}``.
        """
        return self.driver.execute_script(_READ_ROOMS)

    def active_room(self) -> Optional[str]:
        """
        :return: the room on view.
        """
        for room in self.rooms():
            if room["active"]:
                return room["room"]
        return None

    def text_of(self, element_id: str) -> str:
        """
        :return: the text of the element with this id (an error message, say).
        """
        return self.driver.find_element(By.ID, element_id).text

    def stored(self, key: str) -> Optional[str]:
        """
        :return: what the page keeps under ``key`` in localStorage.
        """
        return self.driver.execute_script("return localStorage.getItem(arguments[0]);", key)

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

    def wait_for_texts(self, expected: List[str]) -> None:
        """
        Wait until the log's messages are exactly ``expected``, in order.
        """
        self.wait(
            lambda driver: self.texts() == expected,
            "#messages to hold exactly {} messages ending {}".format(len(expected), expected[-3:]),
        )

    def wait_for_room(self, room: str, state: str = "joined") -> None:
        """
        Wait until the room list shows ``room`` in ``state``.
        """
        self.wait(
            lambda driver: any(r["room"] == room and r["state"] == state for r in self.rooms()),
            "#rooms to show {} as {}".format(room, state),
        )

    def wait_for_log(self, words: str) -> List[str]:
        """
        Wait until an entry of the log on view contains ``words``.

        :return: the log's lines.
        """

        def shown(driver):
            lines = self.log_lines()
            return lines if any(words in line for line in lines) else False

        return self.wait(shown, "{!r} in the log".format(words))

    def join_room(self, room: str) -> None:
        """
        Type ``room`` into the join box and press Enter.
        """
        box = self.driver.find_element(By.ID, "room-name")
        box.clear()
        box.send_keys(room, Keys.ENTER)

    def select_room(self, room: str) -> None:
        """
        Click ``room`` in the room list and wait until it is on view.
        """
        self.driver.find_element(
            By.CSS_SELECTOR, '#rooms li[data-room="{}"] .room-select'.format(room)
        ).click()
        self.wait(lambda driver: self.active_room() == room, "{} to be on view".format(room))

    def leave_room(self, room: str) -> None:
        """
        Click the leave button of ``room`` (which must be on view).
        """
        self.driver.find_element(
            By.CSS_SELECTOR, '#rooms li[data-room="{}"] .room-leave'.format(room)
        ).click()

    def set_name(self, name: str) -> None:
        """
        Type ``name`` into the name box and press Enter.
        """
        box = self.driver.find_element(By.ID, "display-name")
        box.clear()
        box.send_keys(name, Keys.ENTER)

    def send_text(self, text: str) -> None:
        """
        Type ``text`` into the message box and press Enter.
        """
        self.driver.find_element(By.ID, "text").send_keys(text, Keys.ENTER)

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

    def entries(self) -> List[dict]:
        """
        :return: the log's entries, each ``{kind, text}``; ``kind`` is
            ``message``, ``divider``, ``history-marker``, ``notice`` or ``other``.
        """
        return self.driver.execute_script(_READ_ENTRIES)

    def marker(self) -> Optional[str]:
        """
        :return: what the top of the log says, or ``None`` if nothing.
        """
        return self.driver.execute_script(_READ_MARKER)

    def scroll_log_to_top(self) -> tuple:
        """
        Scroll the log to its top.

        :return: ``(text, top)``: the first message shown and its distance
            from the log's top, in pixels, before the page reacted.
        """
        return tuple(self.driver.execute_script(_SCROLL_TO_TOP))

    def place_of(self, text: str) -> float:
        """
        :return: the distance of the message ``text`` from the log's top, in pixels.
        """
        return self.driver.execute_script(_PLACE_OF, text)

    def focus(self) -> dict:
        """
        :return: the element with the keyboard's focus, ``{id, className,
            room, outline}``: ``room`` is that of the room list's entry it
            is in, ``outline`` whether a focus ring is drawn.
        """
        return self.driver.execute_script(_READ_FOCUS)

    def press(self, *keys: str) -> None:
        """
        Press ``keys`` wherever the keyboard's focus is, as a user would.
        """
        ActionChains(self.driver).send_keys(*keys).perform()

    def press_with(self, modifier: str, key: str) -> None:
        """
        Press ``key`` while holding ``modifier`` (``Keys.ALT``, say).
        """
        ActionChains(self.driver).key_down(modifier).send_keys(key).key_up(modifier).perform()

    def tab_to(self, wanted: Callable[[dict], bool], what: str, backwards: bool = False) -> dict:
        """
        Press Tab (Shift+Tab if ``backwards``) until ``wanted(self.focus())``.

        :return: the focus, as :meth:`focus` describes it.
        :raise FailTest: if 30 presses did not get there.
        """
        seen = []
        for _ in range(30):
            if backwards:
                self.press_with(Keys.SHIFT, Keys.TAB)
            else:
                self.press(Keys.TAB)
            focus = self.focus()
            if wanted(focus):
                return focus
            seen.append(focus["id"] or focus["room"] or focus["className"])
        raise FailTest("Tab never reached {}; it went through {}".format(what, seen))

    def choose_files(self, *paths: str) -> None:
        """
        Choose files in the Image button's file chooser, as the user would in
        its dialog (which a headless browser never shows).
        """
        self.driver.find_element(By.ID, "image-file").send_keys("\n".join(paths))

    def hand_over(self, how: str, selector: str, name: str, mime_type: str, data: bytes) -> bool:
        """
        Paste (``how`` is ``paste``) or drop (``drop``) a file on the element
        ``selector`` finds.

        :return: whether the page took it.
        """
        encoded = base64.b64encode(data).decode("ascii")
        return self.driver.execute_script(_HAND_OVER, how, selector, name, mime_type, encoded)

    def upload(self) -> dict:
        """
        :return: ``{state, status, progress, bytes, error, error_shown}``:
            what is said under the message box about images being shared;
            ``progress`` is the bar's ``[value, max]``, ``null`` when hidden.
        """
        return self.driver.execute_script(_READ_UPLOAD)

    def wait_for_upload(self, condition: Callable[[dict], bool], what: str) -> dict:
        """
        Wait until ``condition`` holds of :meth:`upload`.

        :return: what :meth:`upload` said then.
        """

        def said(driver):
            upload = self.upload()
            return upload if condition(upload) else False

        try:
            return self.wait(said, what)
        except FailTest as e:
            raise FailTest("{}\nunder the message box: {}".format(e, self.upload())) from None

    def pictures(self) -> List[dict]:
        """
        :return: ``{from, mine, size}`` of each picture in the log on view;
            ``size`` is ``[width, height]`` once the browser has decoded it.
        """
        return self.driver.execute_script(_READ_PICTURES)

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

    def send_binary(self, data: bytes) -> None:
        """
        Send a binary message.
        """
        self._ws.send_binary(data)

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


def server_args(*args: str):
    """
    Run the decorated test against a server started with these
    ``twistd broadcaster`` arguments.
    """

    def decorate(test):
        test.server_args = args
        return test

    return decorate


class PageTestCase(TestCase):
    """
    A real server on a loopback port and a headless chromium to show its
    page; the tests come from the subclasses.
    """

    #: What shows the server's page (a subclass of :class:`Page` for another page).
    page_class = Page

    def server_arguments(self):
        """
        :return: the ``twistd broadcaster`` arguments of this test's server
            (see :func:`server_args`).
        """
        return getattr(getattr(self, self._testMethodName), "server_args", ())

    @inlineCallbacks
    def setUp(self):
        missing = missing_browser()
        if missing is not None:
            if os.environ.get("CI"):
                self.fail("{}; CI is set, so the browser tests must run".format(missing))
            raise SkipTest(missing)
        self.service, port = yield start_server(self, self.server_arguments())
        self.port = port
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
        self.page = yield deferToThread(self.page_class.start)
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
    def json_client(self, name, rooms=()):
        """
        Connect a JSON-mode script client called ``name`` and put it in ``rooms``.

        :return: a Deferred firing with ``(client, its id)``.
        """
        client, welcome = yield join_chat(self, self.port, name)
        for room in rooms:
            client.send_json({"type": "join", "room": room})
            # The reply (presence) may come before the event (our own join).
            seen = yield read_until(client, of_type("join", room=room, id=welcome["id"]))
            if not [e for e in seen if e["type"] == "presence"]:
                yield read_until(client, of_type("presence", room=room))
        return client, welcome["id"]


class ChatPageTests(PageTestCase):
    """
    The chat page, served by a real server and shown by headless chromium.
    """

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


class RoomPageTests(PageTestCase):
    """
    Rooms, names and recovery after a reconnect on the chat page, with
    JSON-mode script clients (Autobahn, in the reactor) as the others.
    """

    @inlineCallbacks
    def cut(self, page_id):
        """
        Drop the page's connection on the server's side, as a network
        failure would, and wait until the hub has let it go.
        """
        self.service.hub.member(page_id).transport.abortConnection()
        yield wait_for(
            lambda: page_id not in self.service.hub,
            what="the hub to drop the page's member {}".format(page_id),
        )

    @inlineCallbacks
    def test_room_switcher(self):
        """
        The page joins a room by name, shows that room's messages and members
        only in its view (with an unread badge meanwhile), sends to the room
        on view, remembers it, and leaves it.
        """
        bob, bob_id = yield self.json_client("bob", ["dev"])
        carol = yield self.script_client()
        page_id = yield deferToThread(self.page.open, self.url)

        yield deferToThread(self.page.join_room, "-dev")
        error = yield deferToThread(self.page.text_of, "room-error")
        self.assertIn("letter or digit", error)
        rooms = yield deferToThread(self.page.rooms)
        self.assertEqual([r["room"] for r in rooms], ["lobby"], "an invalid room was joined")

        yield deferToThread(self.page.join_room, "dev")
        yield deferToThread(self.page.wait_for_room, "dev")
        joined = (yield read_until(bob, of_type("join", room="dev")))[-1]
        self.assertEqual(joined["id"], page_id)
        self.assertEqual((yield deferToThread(self.page.active_room)), "dev")
        yield deferToThread(self.page.wait_for_members, [bob_id, page_id])
        yield deferToThread(self.page.select_room, "lobby")
        yield deferToThread(self.page.wait_for_members, [bob_id, carol.id, page_id])

        bob.send_json({"type": "message", "room": "dev", "text": "only in dev"})
        yield deferToThread(
            self.page.wait,
            lambda driver: {"room": "dev", "active": False, "state": "joined", "unread": "1"}
            in self.page.rooms(),
            "an unread badge of 1 on dev",
        )
        lobby = yield deferToThread(self.page.texts)
        self.assertEqual(lobby, [], "dev's message is in the lobby")

        yield deferToThread(self.page.select_room, "dev")
        yield deferToThread(self.page.wait_for_message, bob_id, "only in dev")
        rooms = yield deferToThread(self.page.rooms)
        self.assertEqual([r["unread"] for r in rooms], ["", ""], "a badge outlived its reading")

        yield deferToThread(self.page.send_text, "from the page")
        message = (yield read_until(bob, of_type("message", text="from the page")))[-1]
        self.assertEqual((message["room"], message["from"]), ("dev", page_id))
        yield deferToThread(self.page.wait_for_message, page_id, "from the page")
        self.assertEqual((yield deferToThread(self.page.stored, "broadcaster.rooms")), '["dev"]')

        yield deferToThread(self.page.leave_room, "dev")
        left = (yield read_until(bob, of_type("leave", room="dev")))[-1]
        self.assertEqual(left["id"], page_id)
        rooms = yield deferToThread(self.page.rooms)
        self.assertEqual([(r["room"], r["active"]) for r in rooms], [("lobby", True)])
        self.assertEqual((yield deferToThread(self.page.stored, "broadcaster.rooms")), "[]")

    @inlineCallbacks
    def test_rooms_remembered(self):
        """
        A page loaded again joins the rooms it had joined before.
        """
        bob, _ = yield self.json_client("bob", ["dev"])
        page_id = yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.join_room, "dev")
        yield deferToThread(self.page.wait_for_room, "dev")
        yield read_until(bob, of_type("join", room="dev", id=page_id))

        yield deferToThread(self.page.driver.refresh)
        new_id = yield deferToThread(self.page.wait_connected, page_id)
        yield read_until(bob, of_type("join", room="dev", id=new_id))
        yield deferToThread(self.page.wait_for_room, "dev")

    @inlineCallbacks
    def test_names(self):
        """
        The page connects with the name in its own URL, sets another with
        the name box (checked first), shows other people by name and
        remembers its name for the next visit.
        """
        bob, bob_id = yield self.json_client("bob")
        page_id = yield deferToThread(self.page.open, self.url + "?name=Zoe")
        self.assertEqual(self.service.hub.member(page_id).name, "Zoe")

        yield deferToThread(self.page.set_name, "   ")
        error = yield deferToThread(self.page.text_of, "name-error")
        self.assertIn("empty", error)

        yield deferToThread(self.page.set_name, "Ann")
        renamed = (yield read_until(bob, of_type("rename", id=page_id)))[-1]
        self.assertEqual(renamed["name"], "Ann")
        yield deferToThread(
            self.page.wait,
            lambda driver: self.page.member_names().get(page_id) == "Ann",
            "the page to list itself as Ann",
        )
        yield deferToThread(self.page.send_text, "hi from Ann")
        message = (yield read_until(bob, of_type("message", text="hi from Ann")))[-1]
        self.assertEqual((message["from"], message["name"]), (page_id, "Ann"))

        bob.send_json({"type": "message", "text": "hi from bob"})
        shown = yield deferToThread(self.page.wait_for_message, bob_id, "hi from bob")
        self.assertEqual(shown["name"], "bob")
        names = yield deferToThread(self.page.member_names)
        self.assertEqual(names, {bob_id: "bob", page_id: "Ann"})
        self.assertEqual((yield deferToThread(self.page.stored, "broadcaster.name")), "Ann")

        # The next visit, without ?name=, connects with the remembered name.
        new_id = yield deferToThread(self.page.open, self.url)
        self.assertEqual(self.service.hub.member(new_id).name, "Ann")

    @server_args("--max-name-length", "4")
    @inlineCallbacks
    def test_refused_name_does_not_lock_out(self):
        """
        A remembered name the server refuses (here: too long) does not keep
        the page from connecting; it connects without it and says why.
        """
        page_id = yield deferToThread(self.page.open, self.url)
        yield deferToThread(
            self.page.driver.execute_script, "localStorage.setItem('broadcaster.name', 'Annabel');"
        )

        yield deferToThread(self.page.driver.refresh)
        new_id = yield deferToThread(self.page.wait_connected, page_id)
        yield deferToThread(
            self.page.wait,
            lambda driver: "at most 4" in self.page.text_of("name-error"),
            "the name box to say why Annabel was refused",
        )
        self.assertIsNone(self.service.hub.member(new_id).name)
        self.assertIsNone((yield deferToThread(self.page.stored, "broadcaster.name")))

    @inlineCallbacks
    def test_messages_deduplicated_and_ordered(self):
        """
        A message that arrives twice is shown once, and one that arrives
        after a later one of the same room and epoch goes before it.
        """
        bob, bob_id = yield self.json_client("bob")
        page_id = yield deferToThread(self.page.open, self.url)
        bob.send_json({"type": "message", "text": "one"})
        first = (yield read_until(bob, of_type("message", text="one")))[-1]
        yield deferToThread(self.page.wait_for_texts, ["one"])

        def message(seq, text):
            return TextMessage(
                ts=first["ts"], room="lobby", sender=bob_id, text=text, name="bob",
                seq=seq, epoch=first["epoch"],
            )

        # Straight to the page's connection, as a misbehaving server might.
        member = self.service.hub.member(page_id)
        for event in (message(3, "three"), message(2, "two"), message(3, "three")):
            member.deliver(event)
        member.deliver(message(4, "four"))
        yield deferToThread(self.page.wait_for_message, bob_id, "four")
        texts = yield deferToThread(self.page.texts)
        self.assertEqual(texts, ["one", "two", "three", "four"])

    @inlineCallbacks
    def talk(self, client, stop):
        """
        Send "lobby <n>" and "dev <n>", one pair every 20 ms (within the
        server's default rate limit), until ``stop`` is set.

        :param stop: a list; the talking stops once it is not empty.
        :return: a Deferred firing with how many pairs were sent; meanwhile
            ``self.talked`` counts them.
        """
        count = 0
        while not stop:
            client.send_json({"type": "message", "text": "lobby {}".format(count)})
            client.send_json({"type": "message", "room": "dev", "text": "dev {}".format(count)})
            count += 1
            self.talked = count
            yield deferLater(reactor, 0.02, lambda: None)
        return count

    @inlineCallbacks
    def test_recovery_after_a_cut(self):
        """
        When the page's connection is cut while a script keeps talking in the
        lobby and in "dev", the page comes back and shows every message of
        each room exactly once, in order.
        """
        talker, talker_id = yield self.json_client("talker", ["dev"])
        page_id = yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.join_room, "dev")
        yield deferToThread(self.page.wait_for_room, "dev")
        yield deferToThread(self.page.select_room, "lobby")

        stop = []
        self.talked = 0
        talking = self.talk(talker, stop)
        yield deferToThread(
            self.page.wait, lambda driver: len(self.page.texts()) >= 5, "5 messages before the cut"
        )
        yield self.cut(page_id)
        talked_at_cut = self.talked
        yield deferToThread(self.page.wait_connected, page_id)
        talked_at_reconnect = self.talked
        self.assertGreater(talked_at_reconnect, talked_at_cut, "nothing was said during the cut")
        # Some messages live after the reconnect, too.
        yield deferToThread(
            self.page.wait_for_message, talker_id, "lobby {}".format(talked_at_reconnect + 3)
        )
        stop.append(True)
        pairs = yield talking
        talker.send_json({"type": "message", "text": "lobby end"})
        talker.send_json({"type": "message", "room": "dev", "text": "dev end"})

        for room in ("lobby", "dev"):
            expected = ["{} {}".format(room, n) for n in range(pairs)] + ["{} end".format(room)]
            yield deferToThread(self.page.select_room, room)
            yield deferToThread(self.page.wait_for_texts, expected)
            log = yield deferToThread(self.page.log_lines)
            self.assertFalse(
                [line for line in log if "may be missing" in line],
                "complete recovery announced missing messages in {}".format(room),
            )

    @server_args("--history-size", "2")
    @inlineCallbacks
    def test_incomplete_recovery(self):
        """
        When more was said during a cut than the room remembers, the page
        shows what could be replayed and says that messages may be missing.
        """
        talker, talker_id = yield self.json_client("talker", ["dev"])
        page_id = yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.join_room, "dev")
        yield deferToThread(self.page.wait_for_room, "dev")
        talker.send_json({"type": "message", "room": "dev", "text": "before"})
        yield deferToThread(self.page.wait_for_message, talker_id, "before")

        yield self.cut(page_id)
        for n in range(1, 6):
            talker.send_json(
                {"type": "message", "room": "dev", "text": "missed {}".format(n), "ref": n}
            )
        yield read_until(talker, of_type("ack", ref=5))
        self.assertEqual(
            self.service.hub.member_ids(), [talker_id], "the page came back before the talk ended"
        )

        yield deferToThread(self.page.wait_connected, page_id)
        self.assertEqual((yield deferToThread(self.page.active_room)), "dev")
        yield deferToThread(self.page.wait_for_log, "Some messages in #dev may be missing")
        yield deferToThread(self.page.wait_for_texts, ["before", "missed 4", "missed 5"])
        log = yield deferToThread(self.page.log_lines)
        where = [i for i, line in enumerate(log) if "may be missing" in line or "missed" in line]
        self.assertIn("may be missing", log[where[0]], "the notice is not before the replay")

        yield deferToThread(self.page.select_room, "lobby")
        log = yield deferToThread(self.page.log_lines)
        self.assertFalse([line for line in log if "may be missing" in line])


class ConversationPageTests(PageTestCase):
    """
    What the page shows of a conversation: the history of each room on
    opening and further back on scrolling, unread counts, a phone-sized
    window, and the keyboard alone.
    """

    @inlineCallbacks
    def say(self, client, texts, room="lobby"):
        """
        Send ``texts`` from a JSON client to ``room``, in order, and wait
        until the server has numbered them all.
        """
        refs = ["said {}".format(n) for n in range(len(texts))]
        for text, ref in zip(texts, refs):
            client.send_json({"type": "message", "room": room, "text": text, "ref": ref})
        yield read_until(client, of_type("ack", ref=refs[-1]), limit=3 * len(texts) + 100)

    def hold_history(self) -> List[Callable[[], None]]:
        """
        Keep the server from answering history requests until released.

        :return: a list that gets, for each request, a function that
            answers it, with the room's history as it is when called.
        """
        held = []
        original = self.service.hub.history

        def history(member_id, room, limit, before=None):
            answer = Deferred()
            held.append(lambda: original(member_id, room, limit, before).chainDeferred(answer))
            return answer

        self.patch(self.service.hub, "history", history)
        return held

    def watch_history(self) -> List[str]:
        """
        :return: a list that gets the room of each history request the
            server has answered.
        """
        answered = []
        original = self.service.hub.history

        def history(member_id, room, limit, before=None):
            def record(messages):
                answered.append(room)
                return messages

            return original(member_id, room, limit, before).addCallback(record)

        self.patch(self.service.hub, "history", history)
        return answered

    def wait_for_unread(self, counts: dict, title: str):
        """
        Wait until the room list's badges are ``counts`` (``{room:
        "3"}``, ``""`` for none) and the tab's title is ``title``.
        """

        def shown(driver):
            badges = {r["room"]: r["unread"] for r in self.page.rooms()}
            return badges == counts and driver.title == title

        return deferToThread(
            self.page.wait, shown, "badges {} and the title {!r}".format(counts, title)
        )

    @inlineCallbacks
    def test_history_on_open(self):
        """
        A page opened after a conversation began shows its messages, in
        order, above the "new since you arrived" divider, and what is said
        later below it.  A message said while the history is on its way
        arrives both live and in the history, and is shown once, below.
        """
        bob, bob_id = yield self.json_client("bob")
        earlier = ["earlier {}".format(n) for n in range(3)]
        yield self.say(bob, earlier)
        held = self.hold_history()

        yield deferToThread(self.page.open, self.url)
        yield wait_for(lambda: held, what="the page to ask for the lobby's history")
        yield deferToThread(self.page.wait, lambda d: self.page.marker(), "a loading notice")
        self.assertEqual((yield deferToThread(self.page.marker)), "Loading earlier messages…")
        yield self.say(bob, ["meanwhile"])
        yield deferToThread(self.page.wait_for_texts, ["meanwhile"])
        for answer in held:
            answer()
        # "earlier" comes only with the reply, which holds "meanwhile" too.
        yield deferToThread(self.page.wait_for_texts, earlier + ["meanwhile"])
        yield self.say(bob, ["later"])
        yield deferToThread(self.page.wait_for_texts, earlier + ["meanwhile", "later"])

        entries = yield deferToThread(self.page.entries)
        kinds = [(e["kind"], e["text"]) for e in entries if e["kind"] in ("message", "divider")]
        self.assertEqual(
            kinds,
            [("message", text) for text in earlier]
            + [("divider", "New since you arrived")]
            + [("message", "meanwhile"), ("message", "later")],
        )
        self.assertEqual(entries[0]["kind"], "history-marker")
        self.assertEqual((yield deferToThread(self.page.marker)), "Beginning of the conversation")
        messages = yield deferToThread(self.page.messages)
        self.assertEqual({(m["from"], m["name"], m["mine"]) for m in messages}, {(bob_id, "bob", False)})
        self.assertEqual((yield deferToThread(self.page.console_errors)), [])

    @server_args("--history-size", "200")
    @inlineCallbacks
    def test_scrolling_back(self):
        """
        With more kept than the page shows on opening, its "Load earlier
        messages" button (from the keyboard) and scrolling to the top of
        the log fetch the earlier messages, page by page, until the first;
        what the reader sees stays in place meanwhile.
        """
        bob, _ = yield self.json_client("bob")
        said = ["said {}".format(n) for n in range(130)]
        yield self.say(bob, said)
        yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.wait_for_texts, said[-50:])
        self.assertEqual((yield deferToThread(self.page.marker)), "Load earlier messages")

        # Focused where it is, so that only the button, not scrolling to
        # it, asks for the page before.
        yield deferToThread(
            self.page.driver.execute_script,
            "document.querySelector('#messages .load-older').focus({preventScroll: true});",
        )
        yield deferToThread(self.page.press, Keys.ENTER)
        yield deferToThread(self.page.wait_for_texts, said[-100:])
        self.assertEqual((yield deferToThread(self.page.marker)), "Load earlier messages")

        for _ in range(5):
            if (yield deferToThread(self.page.marker)) == "Beginning of the conversation":
                break
            shown = len((yield deferToThread(self.page.texts)))
            first, top = yield deferToThread(self.page.scroll_log_to_top)
            yield deferToThread(
                self.page.wait,
                lambda driver: len(self.page.texts()) > shown and self.page.marker() != "Loading…",
                "earlier messages than {!r}".format(first),
            )
            place = yield deferToThread(self.page.place_of, first)
            self.assertLessEqual(
                abs(place - top), 1,
                "{!r} moved from {} to {} as messages came in".format(first, top, place),
            )
        self.assertEqual((yield deferToThread(self.page.texts)), said)
        self.assertEqual((yield deferToThread(self.page.marker)), "Beginning of the conversation")
        # The button went with the last page: the keyboard's focus did not go with it.
        self.assertEqual((yield deferToThread(self.page.focus))["id"], "messages")

    @inlineCallbacks
    def test_unread_counts(self):
        """
        Messages from others to a room the page is in but not showing count
        in its badge and in the tab's title until it is shown; history and
        the page's own messages never count.
        """
        bob, _ = yield self.json_client("bob", ["dev"])
        yield self.say(bob, ["old 1", "old 2"], room="dev")
        yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.join_room, "dev")
        yield deferToThread(self.page.wait_for_texts, ["old 1", "old 2"])
        yield deferToThread(self.page.select_room, "lobby")

        # A fresh page joins dev again, and its history arrives unseen.
        answered = self.watch_history()
        page_id = yield deferToThread(self.page.open, self.url)
        yield wait_for(lambda: "dev" in answered, what="dev's history sent to the page")
        self.assertEqual((yield deferToThread(self.page.active_room)), "lobby")
        yield self.say(bob, ["new 1", "new 2", "new 3"], room="dev")
        yield self.wait_for_unread({"lobby": "", "dev": "3"}, "(3) broadcaster")
        yield self.say(bob, ["in view"])
        yield deferToThread(self.page.wait_for_texts, ["in view"])
        yield self.wait_for_unread({"lobby": "", "dev": "3"}, "(3) broadcaster")

        yield deferToThread(self.page.select_room, "dev")
        yield self.wait_for_unread({"lobby": "", "dev": ""}, "broadcaster")
        texts = yield deferToThread(self.page.texts)
        self.assertEqual(texts, ["old 1", "old 2", "new 1", "new 2", "new 3"])

        # Sent from dev, echoed once the lobby is on view: not unread.
        yield deferToThread(
            self.page.driver.execute_script,
            "document.getElementById('text').value = 'mine';"
            "document.getElementById('compose').requestSubmit();"
            "document.querySelector('#rooms li[data-room=\"lobby\"] .room-select').click();",
        )
        yield read_until(bob, of_type("message", text="mine", **{"from": page_id}))
        yield self.say(bob, ["after mine"], room="dev")
        yield self.wait_for_unread({"lobby": "", "dev": "1"}, "(1) broadcaster")
        yield deferToThread(self.page.select_room, "dev")
        yield self.wait_for_unread({"lobby": "", "dev": ""}, "broadcaster")
        yield deferToThread(self.page.wait_for_texts, texts + ["mine", "after mine"])

    @inlineCallbacks
    def test_phone_sized_window(self):
        """
        In a 390×844 window nothing scrolls sideways, the message box is on
        screen and sends, and the rooms fold away behind a toggle that
        shows the unread total, opens them, and closes with a choice or
        with Escape.
        """
        bob, bob_id = yield self.json_client("bob", ["dev"])
        yield deferToThread(self.page.driver.set_window_size, 390, 844)
        yield deferToThread(self.page.open, self.url)
        width = yield deferToThread(self.page.driver.execute_script, "return innerWidth;")
        self.assertEqual(width, 390, "the browser did not make its window phone-sized")
        yield self.say(bob, ["x" * 300, "a message with an unbreakable " + "y" * 200])
        yield deferToThread(self.page.wait, lambda d: len(self.page.texts()) == 2, "two messages")

        def sideways():
            return self.page.driver.execute_script(
                "return document.documentElement.scrollWidth - innerWidth;"
            )

        self.assertLessEqual((yield deferToThread(sideways)), 0)
        box = yield deferToThread(
            self.page.driver.execute_script,
            "const r = document.getElementById('text').getBoundingClientRect();"
            "return {left: r.left, right: r.right, bottom: r.bottom, width: r.width,"
            " height: innerHeight};",
        )
        self.assertGreaterEqual(box["left"], 0)
        self.assertLessEqual(box["right"], 390)
        self.assertLessEqual(box["bottom"], box["height"])
        self.assertGreater(box["width"], 150, "the message box is too narrow to use")
        yield deferToThread(self.page.send_text, "from a phone")
        yield read_until(bob, of_type("message", text="from a phone"))

        rooms_list = yield deferToThread(self.page.driver.find_element, By.ID, "rooms")
        toggle = yield deferToThread(self.page.driver.find_element, By.ID, "panels-toggle")
        self.assertFalse((yield deferToThread(rooms_list.is_displayed)))
        yield deferToThread(toggle.click)
        self.assertTrue((yield deferToThread(rooms_list.is_displayed)))
        self.assertEqual((yield deferToThread(toggle.get_attribute, "aria-expanded")), "true")
        self.assertEqual((yield deferToThread(self.page.focus))["room"], "lobby")
        self.assertLessEqual((yield deferToThread(sideways)), 0)
        yield deferToThread(self.page.press, Keys.ESCAPE)
        self.assertFalse((yield deferToThread(rooms_list.is_displayed)))
        self.assertEqual((yield deferToThread(self.page.focus))["id"], "panels-toggle")

        yield deferToThread(toggle.click)
        yield deferToThread(self.page.join_room, "dev")
        yield deferToThread(self.page.wait_for_room, "dev")
        self.assertFalse((yield deferToThread(rooms_list.is_displayed)))
        self.assertEqual((yield deferToThread(self.page.focus))["id"], "text")
        yield self.say(bob, ["to the lobby"])
        yield deferToThread(
            self.page.wait,
            lambda driver: driver.execute_script(
                "const badge = document.getElementById('unread-total');"
                "return !badge.hidden && badge.textContent === '1' && document.title;"
            ) == "(1) broadcaster",
            "the toggle and the title to show 1 unread",
        )
        yield deferToThread(toggle.click)
        yield deferToThread(self.page.select_room, "lobby")
        self.assertFalse((yield deferToThread(rooms_list.is_displayed)))
        yield deferToThread(self.page.wait_for_message, bob_id, "to the lobby")
        self.assertLessEqual((yield deferToThread(sideways)), 0)
        self.assertEqual((yield deferToThread(self.page.console_errors)), [])

    @inlineCallbacks
    def test_keyboard_alone(self):
        """
        With the keyboard alone, and a focus ring wherever it is, the page
        joins a room, switches rooms (Tab, the arrow keys, Alt+ArrowUp) and
        sends a message with Enter.
        """
        bob, _ = yield self.json_client("bob", ["dev"])
        page_id = yield deferToThread(self.page.open, self.url)

        yield deferToThread(self.page.tab_to, lambda f: f["id"] == "room-name", "the join box")
        yield deferToThread(self.page.press, "dev", Keys.ENTER)
        yield deferToThread(self.page.wait_for_room, "dev")
        self.assertEqual((yield deferToThread(self.page.active_room)), "dev")
        self.assertEqual((yield deferToThread(self.page.focus))["id"], "text")

        focus = yield deferToThread(
            self.page.tab_to,
            lambda f: f["room"] == "lobby" and "room-select" in f["className"],
            "the lobby in the room list",
            backwards=True,
        )
        self.assertTrue(focus["outline"], "no focus ring on the room list")
        yield deferToThread(self.page.press, Keys.ENTER)
        self.assertEqual((yield deferToThread(self.page.active_room)), "lobby")
        yield deferToThread(self.page.press, Keys.ARROW_DOWN)
        focus = yield deferToThread(self.page.focus)
        self.assertEqual((focus["room"], focus["outline"]), ("dev", True))
        yield deferToThread(self.page.press, Keys.ENTER)
        self.assertEqual((yield deferToThread(self.page.active_room)), "dev")
        yield deferToThread(self.page.press_with, Keys.ALT, Keys.ARROW_UP)
        self.assertEqual((yield deferToThread(self.page.active_room)), "lobby")

        focus = yield deferToThread(self.page.tab_to, lambda f: f["id"] == "text", "the message box")
        self.assertTrue(focus["outline"], "no focus ring on the message box")
        yield deferToThread(self.page.press, "typed, not clicked", Keys.ENTER)
        message = (yield read_until(bob, of_type("message", text="typed, not clicked")))[-1]
        self.assertEqual((message["room"], message["from"]), ("lobby", page_id))


def encoded(size, colour, image_format: str) -> bytes:
    """
    :return: a picture of ``size`` in one ``colour``, encoded by Pillow as
        ``image_format``.
    """
    picture = io.BytesIO()
    Image.new("RGB", size, colour).save(picture, format=image_format)
    return picture.getvalue()


class ImagePageTests(PageTestCase):
    """
    Images from the raw-TCP image port, and raw binary from WebSocket
    clients, as the page shows them.
    """

    @inlineCallbacks
    def test_image_from_the_image_port_is_displayed(self):
        """A PNG a camera sends on the image port appears in the page as an
        image of the right size, decoded by the browser."""
        yield deferToThread(self.page.open, self.url)
        camera = yield connect_raw(self, port_of(self.service.image_endpoint), FrameClient)
        camera.send_frame(encoded((37, 23), (10, 200, 30), "JPEG"))

        def shown(driver):
            for image in driver.find_elements(By.CSS_SELECTOR, "#messages img"):
                width = driver.execute_script("return arguments[0].naturalWidth", image)
                height = driver.execute_script("return arguments[0].naturalHeight", image)
                if (width, height) == (37, 23):
                    return True
            return False

        yield deferToThread(self.page.wait, shown, "a 37x23 image in #messages")

    @inlineCallbacks
    def test_raw_binary_is_a_download_never_a_picture(self):
        """
        Bytes a WebSocket client sends raw are never shown as a picture, even
        when they are a valid PNG or WebP: the page names the sender and the
        size and offers the bytes, unchanged, for download.  Pictures come
        only from image events, which the server has re-encoded, and text
        sent meanwhile is shown as usual.
        """
        yield deferToThread(self.page.open, self.url)
        stranger = yield self.script_client()
        camera = yield connect_raw(self, port_of(self.service.image_endpoint), FrameClient)
        png = encoded((11, 7), (200, 10, 10), "PNG")
        webp = encoded((9, 5), (10, 10, 200), "WEBP")
        self.assertEqual((webp[:4], webp[8:12]), (b"RIFF", b"WEBP"))

        camera.send_frame(encoded((37, 23), (10, 200, 30), "JPEG"))
        yield deferToThread(self.page.wait, self.displayed(1), "the camera's image in #messages")
        yield deferToThread(stranger.send_binary, png)
        yield deferToThread(stranger.send_binary, webp)
        yield deferToThread(stranger.send, "did you see my pictures?")

        yield deferToThread(self.page.wait_for_message, stranger.id, "did you see my pictures?")
        binaries = yield deferToThread(self.page.binaries)
        offered = {"from": stranger.id, "images": 0, "download": True}
        self.assertEqual(
            binaries,
            [
                dict(offered, text="{} sent binary, {} bytes".format(stranger.id, len(png))),
                dict(offered, text="{} sent binary, {} bytes".format(stranger.id, len(webp))),
            ],
        )
        images = yield deferToThread(
            self.page.driver.find_elements, By.CSS_SELECTOR, "#messages img"
        )
        self.assertEqual(len(images), 1, "raw bytes were shown as a picture")

        yield deferToThread(
            self.page.driver.find_element(By.CSS_SELECTOR, "#messages .binary .download").click
        )
        files = yield deferToThread(
            self.page.wait, lambda driver: self.page.downloaded(), "the PNG's bytes downloaded"
        )
        self.assertEqual(list(files.values()), [png])
        (name,) = files
        self.assertTrue(name.endswith(".bin"), "saved as {}, which a viewer may open".format(name))
        errors = yield deferToThread(self.page.console_errors)
        self.assertEqual(errors, [])

    @staticmethod
    def displayed(count: int):
        """
        :return: a condition on the driver: ``count`` pictures in the log,
            each decoded by the browser.
        """

        def condition(driver):
            return driver.execute_script(
                "const pictures = document.querySelectorAll('#messages img');"
                "return pictures.length === arguments[0]"
                " && Array.from(pictures).every((p) => p.complete && p.naturalWidth > 0);",
                count,
            )

        return condition


def png_file(testcase: TestCase, name: str, data: bytes) -> str:
    """
    :return: the path of a new file called ``name`` holding ``data``, in a
        folder of ``testcase``'s own.
    """
    folder = os.path.abspath(testcase.mktemp())
    os.makedirs(folder)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


class ImageUploadPageTests(PageTestCase):
    """
    Images shared from the page: chosen with its Image button, pasted, or
    dropped on the conversation; and those it refuses.
    """

    @inlineCallbacks
    def another_page(self):
        """
        A second browser on the chat page, closed at cleanup.

        :return: a Deferred firing with ``(page, its id)``.
        """
        page = yield deferToThread(Page.start)
        self.addCleanup(deferToThread, page.quit)
        page_id = yield deferToThread(page.open, self.url)
        return page, page_id

    @inlineCallbacks
    def test_chosen_images_reach_everyone(self):
        """
        Two PNGs chosen at once with the Image button are shared one after
        the other: another browser shows both, as pictures of the right
        size, the sender sees them as its own and "Shared", and an
        image-port client gets them as the server's normalised PNGs
        (transparency flattened onto white).
        """
        page_id = yield deferToThread(self.page.open, self.url)
        other, _ = yield self.another_page()
        camera = yield connect_raw(self, port_of(self.service.image_endpoint), FrameClient)
        yield wait_for(lambda: len(self.service.hub) == 3, what="both pages and the camera")
        clear = io.BytesIO()
        Image.new("RGBA", (31, 17), (255, 0, 0, 0)).save(clear, format="PNG")
        paths = [
            png_file(self, "clear.png", clear.getvalue()),
            png_file(self, "green.png", encoded((20, 40), (10, 200, 30), "PNG")),
        ]

        yield deferToThread(self.page.choose_files, *paths)
        upload = yield deferToThread(
            self.page.wait_for_upload,
            lambda u: u["state"] == "shared" and "green.png" in u["status"],
            '"Shared" for the second image',
        )
        self.assertEqual(upload["status"], 'Shared "green.png" in #lobby.')
        self.assertEqual(upload["error"], "")
        expected = [
            {"from": page_id, "mine": False, "size": [31, 17]},
            {"from": page_id, "mine": False, "size": [20, 40]},
        ]
        yield deferToThread(
            other.wait, lambda driver: other.pictures() == expected, "both pictures, decoded"
        )
        yield deferToThread(
            self.page.wait,
            lambda driver: self.page.pictures() == [dict(p, mine=True) for p in expected],
            "both pictures, as the sender's own",
        )
        for size, colour in [((31, 17), (255, 255, 255)), ((20, 40), (10, 200, 30))]:
            picture = Image.open(io.BytesIO((yield camera.next())))
            self.assertEqual((picture.format, picture.mode, picture.size), ("PNG", "RGB", size))
            self.assertEqual(picture.getpixel((0, 0)), colour)
        for page in (self.page, other):
            self.assertEqual((yield deferToThread(page.console_errors)), [])

    @inlineCallbacks
    def hand_over(self, viewer, page_id, how, selector, size, room):
        """
        Paste or drop (``how``) a PNG of ``size`` on ``selector`` in the page,
        and check that it is shared in ``room``: the JSON client ``viewer``
        gets it, and the page says "Shared".

        :return: a Deferred firing with the PNG ``viewer`` got.
        """
        name = "{}.png".format(how)
        data = encoded(size, (200, 10, 10), "PNG")
        took = yield deferToThread(self.page.hand_over, how, selector, name, "image/png", data)
        self.assertTrue(took, "the page left the {} to the browser".format(how))
        header = (yield read_until(viewer, of_type("image", room=room)))[-1]
        self.assertEqual((header["from"], header["width"], header["height"]), (page_id, *size))
        png, binary = yield viewer.next()
        self.assertTrue(binary)
        self.assertEqual(Image.open(io.BytesIO(png)).size, size)
        shared = 'Shared "{}" in #{}.'.format(name, room)
        yield deferToThread(self.page.wait_for_upload, lambda u: u["status"] == shared, shared)
        return png

    @inlineCallbacks
    def test_pasted_and_dropped_images_go_to_the_room_on_view(self):
        """
        A PNG dropped on the conversation is shared in the room on view, and
        one pasted into the message box in the lobby once that is on view;
        the image-port client gets only the lobby's.
        """
        bob, _ = yield self.json_client("bob", ["dev"])
        camera = yield connect_raw(self, port_of(self.service.image_endpoint), FrameClient)
        page_id = yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.join_room, "dev")
        yield deferToThread(self.page.wait_for_room, "dev")

        yield self.hand_over(bob, page_id, "drop", "#messages", (12, 34), "dev")
        yield deferToThread(self.page.select_room, "lobby")
        png = yield self.hand_over(bob, page_id, "paste", "#text", (56, 7), "lobby")
        self.assertEqual((yield camera.next()), png)
        yield deferToThread(
            self.page.wait,
            lambda driver: self.page.pictures() == [
                {"from": page_id, "mine": True, "size": [56, 7]}
            ],
            "the pasted picture in the lobby",
        )

    def stalled(self, page_id):
        """
        Have the server read nothing more from the page until the returned
        transport's ``resumeProducing``.
        """
        transport = self.service.hub.member(page_id).transport
        transport.pauseProducing()
        self.addCleanup(lambda: transport.connected and transport.resumeProducing())
        return transport

    def noise_file(self) -> str:
        """
        :return: the path of a PNG larger than loopback's socket buffers
            take (a few MB), and than their own --max-message-size.
        """
        side = 2000
        noise = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
        picture = io.BytesIO()
        noise.save(picture, format="PNG", compress_level=0)
        self.assertGreater(len(picture.getvalue()), 10 * 1000 * 1000)
        return png_file(self, "noise.png", picture.getvalue())

    @inlineCallbacks
    def wait_for_part_sent(self, waiting=""):
        """
        Wait until the page shows its image as part sent.

        :return: a Deferred firing with what is said under the message box.
        """
        upload = yield deferToThread(
            self.page.wait_for_upload,
            lambda u: u["state"] == "sending" and u["progress"] and u["progress"][0] > 0,
            "part of the image sent",
        )
        self.assertEqual(upload["status"], 'Sending "noise.png" to #lobby…' + waiting)
        return upload

    @inlineCallbacks
    def test_progress_while_the_bytes_leave(self):
        """
        While the server reads nothing from the page, an image too large for
        the sockets' buffers shows as under way, part sent; once the server
        reads again it is shared.
        """
        page_id = yield deferToThread(self.page.open, self.url)
        path = self.noise_file()
        transport = self.stalled(page_id)
        yield deferToThread(self.page.choose_files, path)
        upload = yield self.wait_for_part_sent()
        sent, total = upload["progress"]
        self.assertLess(sent, total)
        self.assertTrue(upload["bytes"].endswith(" MB of {:.1f} MB".format(total / 1e6)), upload)
        transport.resumeProducing()
        yield deferToThread(
            self.page.wait_for_upload,
            lambda u: u["status"] == 'Shared "noise.png" in #lobby.',
            "the image shared",
        )

    @inlineCallbacks
    def test_a_lost_connection_fails_the_images(self):
        """
        The connection lost while an image is being sent: that image and
        the one waiting behind it are said not to be shared, and once the
        page has reconnected an image is shared again.
        """
        page_id = yield deferToThread(self.page.open, self.url)
        paths = [self.noise_file(), png_file(self, "small.png", encoded((5, 5), (0, 0, 0), "PNG"))]
        transport = self.stalled(page_id)
        yield deferToThread(self.page.choose_files, *paths)
        yield self.wait_for_part_sent(" (1 more waiting)")
        transport.abortConnection()
        upload = yield deferToThread(self.page.wait_for_upload, lambda u: u["error"], "failures")
        self.assertEqual(
            upload["error"],
            'Could not share "noise.png": the connection was lost.'
            ' Could not share "small.png": the connection was lost.',
        )
        self.assertEqual((upload["state"], upload["status"], upload["progress"]), (None, "", None))
        yield deferToThread(self.page.wait_connected, page_id)
        yield deferToThread(self.page.choose_files, paths[1])
        upload = yield deferToThread(
            self.page.wait_for_upload, lambda u: u["state"] == "shared", "the image shared"
        )
        self.assertEqual(upload["error"], "")

    @server_args("--max-image-size", "2000")
    @inlineCallbacks
    def test_refusals_leave_the_page_connected(self):
        """
        A file that is not an image, and an image larger than
        --max-image-size, are refused with a visible reason before a byte is
        sent; one the server cannot read is refused with the server's
        reason.  The page stays connected all along, and nothing reaches
        the room.
        """
        bob, _ = yield self.json_client("bob")
        page_id = yield deferToThread(self.page.open, self.url)

        notes = png_file(self, "notes.txt", b"not a picture at all")
        yield deferToThread(self.page.choose_files, notes)
        upload = yield deferToThread(
            self.page.wait_for_upload, lambda u: u["error"], "the text file refused"
        )
        self.assertEqual(upload["error"], '"notes.txt" is not an image.')
        self.assertTrue(upload["error_shown"])

        big = encoded((60, 60), (0, 0, 0), "BMP")
        self.assertGreater(len(big), 2000)
        yield deferToThread(self.page.choose_files, png_file(self, "big.bmp", big))
        upload = yield deferToThread(
            self.page.wait_for_upload, lambda u: "big.bmp" in u["error"], "the large image refused"
        )
        too_large = '"big.bmp" is too large to share: {:.1f} kB, and the server takes at most {}.'
        self.assertEqual(upload["error"], too_large.format(len(big) / 1000, "2.0 kB"))
        self.assertEqual(upload["state"], None)

        fake = png_file(self, "fake.png", b"\x89PNG but not really")
        yield deferToThread(self.page.choose_files, fake)
        upload = yield deferToThread(
            self.page.wait_for_upload, lambda u: "fake.png" in u["error"], "the server's refusal"
        )
        self.assertTrue(
            upload["error"].startswith('Could not share "fake.png": unsupported image format'),
            upload["error"],
        )
        self.assertTrue(upload["error_shown"])

        self.assertEqual((yield deferToThread(self.page.status))["id"], page_id)
        yield deferToThread(self.page.send_text, "still here")
        heard = yield read_until(bob, of_type("message", text="still here"))
        self.assertEqual([e for e in heard if e["type"] in ("image", "binary")], [])
        self.assertEqual((yield deferToThread(self.page.pictures)), [])
        self.assertEqual((yield deferToThread(self.page.console_errors)), [])

    @inlineCallbacks
    def test_image_button_by_keyboard(self):
        """The Image button is reached with Tab from the message box, with a
        focus ring, and says what else shares an image."""
        yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.tab_to, lambda f: f["id"] == "text", "the message box")
        focus = yield deferToThread(
            self.page.tab_to, lambda f: f["id"] == "image-button", "the Image button", True
        )
        self.assertTrue(focus["outline"], "no focus ring on the Image button")
        title = yield deferToThread(
            lambda: self.page.driver.find_element(By.ID, "image-button").get_attribute("title")
        )
        self.assertIn("paste", title)


class BigLobbyPageTests(PageTestCase):
    """The page in a lobby far larger than one page of members."""

    @inlineCallbacks
    def test_connects_to_a_lobby_of_two_thousand(self):
        """With 2,000 members in the lobby the page connects at once, shows
        the whole count and the first page of members, and lists more on
        "Show more"."""
        yield fill_lobby(self, self.port, 2000)
        yield wait_for(lambda: len(self.service.hub) == 2000, timeout=30, what="2,000 members")
        page_id = yield deferToThread(self.page.open, self.url)
        yield deferToThread(
            self.page.wait,
            lambda driver: self.page.text_of("member-count") == "2001",
            "the member count to be 2001",
        )
        # The first page, and the page itself wherever its id sorts.
        first = yield deferToThread(self.page.members)
        self.assertIn(page_id, first)
        self.assertIn(len(first), (100, 101))
        yield deferToThread(self.page.driver.find_element(By.ID, "more-members").click)
        yield deferToThread(
            self.page.wait,
            lambda driver: len(self.page.members()) in (200, 201),
            "200 members listed",
        )
        listed = yield deferToThread(self.page.members)
        self.assertEqual(len(listed), len(set(listed)))
        errors = yield deferToThread(self.page.console_errors)
        self.assertEqual(errors, [])


class SignedInPageTests(PageTestCase):
    """The page signed in with a token given in its fragment."""

    SECRET = "page-secret-7c1e0f3a9b2d4e6f8a0b1c2d3e4f5a6b"

    def setUp(self):
        # Only clients with a token get in: the secret file is the test's.
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(self.SECRET)
        getattr(type(self), self._testMethodName).server_args = ("--jwt-secret-file", path)
        return super().setUp()

    def token(self, **claims):
        import time

        import jwt

        now = int(time.time())
        return jwt.encode({"sub": "u-7", "exp": now + 600, "iat": now, **claims}, self.SECRET, algorithm="HS256")

    @inlineCallbacks
    def test_token_in_the_fragment(self):
        """Opened as /#token=..., the page signs in with it (the server
        knows the user, the token's name is the page's), and the token
        leaves the address bar; without a token the page is refused."""
        page_id = yield deferToThread(self.page.open, self.url + "#token=" + self.token(name="Tia"))
        member = self.service.hub.member(page_id)
        self.assertEqual((member.user, member.name), ("u-7", "Tia"))
        address = yield deferToThread(lambda: self.page.driver.current_url)
        self.assertNotIn("token", address)
        # A reload in the same tab keeps the sign-in (sessionStorage).
        yield deferToThread(self.page.driver.refresh)
        again = yield deferToThread(self.page.wait_connected, page_id)
        self.assertEqual(self.service.hub.member(again).user, "u-7")

        refused_before = self.service.hub.stats.refused_handshakes["auth"]
        yield deferToThread(self.page.driver.execute_script, "sessionStorage.clear();")
        yield deferToThread(self.page.driver.get, self.url)
        yield wait_for(
            lambda: self.service.hub.stats.refused_handshakes["auth"] > refused_before,
            what="the page without a token refused",
        )
        yield wait_for(lambda: len(self.service.hub) == 0, what="nobody connected")

    @inlineCallbacks
    def test_a_user_with_two_connections_is_one_member(self):
        """Another connection of the page's own user adds nobody to the
        list, and going leaves the user listed and unannounced; another
        user's coming and going are shown."""
        yield deferToThread(self.page.open, self.url + "#token=" + self.token(name="Tia"))
        second = yield connect_client(
            self, self.port, json_mode=True, path="/?token=" + self.token(name="Tia")
        )
        other = yield connect_client(
            self, self.port, json_mode=True, path="/?token=" + self.token(sub="u-8", name="Uma")
        )
        yield deferToThread(
            self.page.wait,
            lambda driver: sorted(self.page.members()) == ["user:u-7", "user:u-8"],
            "one entry per user",
        )
        yield close_client(second)
        yield close_client(other)
        yield deferToThread(
            self.page.wait,
            lambda driver: self.page.members() == ["user:u-7"],
            "Uma gone and Tia still listed",
        )
        lines = yield deferToThread(self.page.log_lines)
        told = [line for line in lines if line.endswith((" joined", " left"))]
        self.assertEqual(len(told), 2, told)
        self.assertTrue(told[0].endswith(" Uma joined") and told[1].endswith(" Uma left"), told)


class EventSourceTests(PageTestCase):
    """``GET /events`` read by the browser's own ``EventSource``."""

    FOLLOW = """
        window.got = [];
        window.recovered = [];
        const stream = new EventSource('/events?room=lobby');
        stream.onmessage = (e) => window.got.push([e.lastEventId, JSON.parse(e.data).text]);
        stream.addEventListener('recovered', (e) => window.recovered.push(JSON.parse(e.data)));
        window.stream = stream;
    """

    def read(self, name):
        return self.page.driver.execute_script("return window[arguments[0]];", name)

    def streams(self):
        return [m for m in self.service.hub.members() if m.kind == "sse"]

    @inlineCallbacks
    def test_event_source_follows_and_recovers(self):
        """EventSource gets the messages; when its connection is cut it
        reconnects by itself with Last-Event-ID, and gets what was said
        meanwhile once, then recovered (complete), then live messages."""
        yield deferToThread(self.page.open, self.url)
        yield deferToThread(self.page.driver.execute_script, self.FOLLOW)
        yield wait_for(self.streams, what="the browser's stream")
        ann, _ = yield join_chat(self, self.port, "ann")

        @inlineCallbacks
        def say(text):
            ann.send_json({"type": "message", "text": text, "ref": text})
            yield read_until(ann, of_type("ack", ref=text))

        def texts():
            return [text for _, text in self.read("got")]

        yield say("before")
        yield deferToThread(self.page.wait, lambda d: texts() == ["before"], "the first message")
        [stream] = self.streams()
        stream.abort()
        yield wait_for(lambda: not self.streams(), what="the stream gone")
        yield say("during 1")
        yield say("during 2")
        yield deferToThread(self.page.wait, lambda d: self.read("recovered"), "the browser's recovery")
        yield say("after")
        yield deferToThread(self.page.wait, lambda d: "after" in texts(), "the last message")
        self.assertEqual(texts(), ["before", "during 1", "during 2", "after"])
        self.assertEqual(self.read("recovered"), [{"type": "recovered", "room": "lobby", "complete": True}])
        ids = [event_id for event_id, _ in self.read("got")]
        self.assertEqual(len(set(ids)), 4)
        yield deferToThread(self.page.driver.execute_script, "window.stream.close();")
