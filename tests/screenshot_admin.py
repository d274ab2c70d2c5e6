"""
Regenerate ``docs/admin.png``, the operator dashboard under load::

    python -m tests.screenshot_admin [--seconds 90] [--out docs/admin.png]

It starts a server on a loopback port (an API key of its own, ``--rate
30``), connects JSON, plain, line-bridge and event-stream clients in a few
rooms, has them talk at a rate that rises and falls (one of them faster
than ``--rate`` lets it), has a handshake from a foreign origin and a
request for a foreign host name refused now and then, and after ``--seconds`` opens the dashboard in headless chromium
(as :mod:`tests.test_admin_page` does), signs in, opens a room, publishes
an announcement and saves the whole page as a PNG.  Everything it started
is stopped before it exits.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import tempfile
from typing import Callable, List

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import task
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import FailTest

from tests.http.test_api import KEY
from tests.http.test_events import open_stream
from tests.support import (
    LineClient,
    RecordingClientProtocol,
    connect_client,
    connect_raw,
    port_of,
    start_server,
)
from tests.test_admin_page import AdminPage
from tests.test_page import missing_browser
from tests.test_rooms import join_chat, of_type, read_until

ROOMS = ["lobby", "dev", "ops", "support", "design"]
NAMES = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal", "ivy", "jo", "kim", "lou", "max", "ned"]


class Cleanups:
    """
    What the test helpers ask of a test case: somewhere to put their
    cleanups, run last added first.
    """

    def __init__(self) -> None:
        self._cleanups: List[tuple] = []
        self.scratch = tempfile.mkdtemp(prefix="broadcaster-screenshot-")

    def addCleanup(self, function: Callable, *args, **kwargs) -> None:
        self._cleanups.append((function, args, kwargs))

    def mktemp(self) -> str:
        return os.path.join(self.scratch, "file-{}".format(len(os.listdir(self.scratch))))

    @inlineCallbacks
    def run(self):
        while self._cleanups:
            function, args, kwargs = self._cleanups.pop()
            try:
                yield maybeDeferred(function, *args, **kwargs)
            except Exception as e:  # keep stopping the rest
                print("cleanup {!r} failed: {}".format(function, e))
        shutil.rmtree(self.scratch, ignore_errors=True)


@inlineCallbacks
def refuse_one(reactor, port: int):
    """
    A browser handshake from a foreign origin (refused: reason ``origin``)
    and a request for a host name the server does not answer to (refused
    403).
    """
    response = yield treq.get(
        "http://127.0.0.1:{}/".format(port), headers={"Host": "rebound.example"}, persistent=False
    )
    yield response.content()
    factory = WebSocketClientFactory("ws://127.0.0.1:{}/".format(port), origin="http://evil.example")
    factory.protocol = RecordingClientProtocol
    client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    try:
        yield client.opened
    except ConnectionError:
        return
    client.sendClose()


@inlineCallbacks
def load(reactor, cleanups: Cleanups, seconds: float):
    """
    Start the server and its clients, and keep them busy for ``seconds``.

    :return: the server and its port.
    """
    key_path = cleanups.mktemp()
    with open(key_path, "w") as f:
        f.write(KEY + "\n")
    service, port = yield start_server(
        cleanups, ["--api-key-file", key_path, "--rate", "30", "--burst", "30", "--node-id", "demo"]
    )
    talkers = []
    for i, name in enumerate(NAMES):
        client, _ = yield join_chat(cleanups, port, name)
        for room in ROOMS[1 : 2 + i % len(ROOMS)]:
            client.send_json({"type": "join", "room": room})
            yield read_until(client, of_type("presence", room=room))
        talkers.append((client, ["lobby"] + ROOMS[1 : 2 + i % len(ROOMS)]))
    for _ in range(6):
        yield connect_client(cleanups, port)
    for _ in range(3):
        yield connect_raw(cleanups, port_of(service.line_endpoint), LineClient)
    for room in ("ops", "lobby"):
        yield open_stream(cleanups, port, "/events?room=" + room)

    started = reactor.seconds()

    def talk():
        # A rate that rises and falls over a minute, between 20 and 100 a second.
        elapsed = reactor.seconds() - started
        wanted = 60 + 40 * math.sin(elapsed / 60 * 2 * math.pi)
        for _ in range(max(0, int(random.gauss(wanted / 10, 1)))):
            client, rooms = random.choice(talkers[1:])
            client.send_json({"type": "message", "room": random.choice(rooms), "text": "busy"})
        # One client far faster than --rate allows, now and then.
        if int(elapsed) % 20 < 6:
            for _ in range(5):
                talkers[0][0].send_json({"type": "message", "text": "flood"})

    chatter = task.LoopingCall(talk)
    chatter.clock = reactor
    chatter.start(0.1)
    cleanups.addCleanup(lambda: chatter.running and chatter.stop())
    refusals = task.LoopingCall(refuse_one, reactor, port)
    refusals.clock = reactor
    refusals.start(7.0)
    cleanups.addCleanup(lambda: refusals.running and refusals.stop())
    yield task.deferLater(reactor, seconds, lambda: None)
    return service, port


def shoot(page: AdminPage, url: str, out: str) -> None:
    """
    Sign in, open a room, announce, and save the whole page (blocking).
    """
    page.driver.set_window_size(1360, 900)
    page.open_signed_in(url)
    page.wait(
        lambda d: page.script(
            "return document.querySelectorAll('#rooms-by-rate tr[data-room]').length >= 3;"
        ),
        "the busiest rooms",
    )
    page.fill("room-name", "dev")
    page.submit("room-form")
    page.wait(
        lambda d: page.script("return document.querySelectorAll('#room-history .text').length > 3;"),
        "dev's history",
    )
    page.fill("announce-room", "ops")
    page.fill("announce-text", "Maintenance tonight at 22:00")
    page.submit("announce-form")
    page.wait_for_action()
    height = page.script("return document.documentElement.scrollHeight;")
    page.driver.set_window_size(1360, height + 200)
    page.script("window.scrollTo(0, 0);")
    # Two frames after the resize: the charts redraw on it.
    page.driver.execute_async_script(
        "const done = arguments[0];"
        " requestAnimationFrame(() => requestAnimationFrame(() => done()));"
    )
    page.driver.save_screenshot(out)


@inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="of load before the picture")
    parser.add_argument("--out", default=os.path.join("docs", "admin.png"))
    options = parser.parse_args(argv)
    missing = missing_browser()
    if missing is not None:
        raise SystemExit(missing)
    random.seed(21)
    cleanups = Cleanups()
    try:
        service, port = yield load(reactor, cleanups, options.seconds)
        page = yield deferToThread(AdminPage.start)
        cleanups.addCleanup(deferToThread, page.quit)
        url = "http://127.0.0.1:{}/admin".format(port)
        try:
            yield deferToThread(shoot, page, url, options.out)
        except FailTest as e:
            raise SystemExit("the dashboard did not show what was expected: {}".format(e))
        print("saved {}".format(options.out))
    finally:
        yield cleanups.run()


if __name__ == "__main__":
    task.react(main)
