"""
The operator dashboard (``/admin``) in a real browser: headless chromium,
driven through selenium as :mod:`tests.test_page` drives the chat page (its
:class:`~tests.test_page.Page` and :class:`~tests.test_page.PageTestCase`),
against a real server with an API key, with Autobahn clients as the
people it watches and acts on.

The page is awaited with :meth:`Page.wait` and the server with
:func:`tests.support.wait_for`: no sleeps.  The figures the page shows are
read from its tiles' and charts' ``data-`` attributes, which hold the
values drawn.
"""

from __future__ import annotations

import json

from selenium.webdriver.common.by import By
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread

from tests.http.test_api import KEY, OTHER_KEY, key_file
from tests.support import close_client
from tests.test_page import Page, PageTestCase
from tests.test_rooms import join_chat, of_type, read_until

_READ_TILES = """
return Object.fromEntries(Array.from(document.querySelectorAll('.tile'),
  (tile) => [tile.id.replace('tile-', ''), tile.dataset.value === undefined || tile.dataset.value === ''
    ? null : Number(tile.dataset.value)]));
"""

_FETCH_STATUS = """
const done = arguments[arguments.length - 1];
fetch(arguments[0], {cache: 'no-store'}).then((r) => done(r.status), (e) => done(String(e)));
"""


class AdminPage(Page):
    """
    The dashboard in a headless chromium.  Every method blocks: call them
    with :func:`deferToThread`.
    """

    def script(self, source: str, *args):
        return self.driver.execute_script(source, *args)

    def sign_in(self, key: str) -> None:
        """
        Type ``key`` into the sign-in form and submit it.
        """
        box = self.driver.find_element(By.ID, "key")
        box.clear()
        box.send_keys(key)
        self.driver.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()

    def open_signed_in(self, url: str, key: str = KEY) -> None:
        """
        Load the dashboard, sign in, and wait until its figures are live.
        """
        self.driver.get(url)
        self.sign_in(key)
        self.wait(lambda d: self.status()["state"] == "live", "the dashboard to be live")

    def shown(self, element_id: str) -> bool:
        return self.script("return !document.getElementById(arguments[0]).hidden;", element_id)

    def tiles(self) -> dict:
        """
        :return: the figure each tile shows, by name (``connections``,
            ``messages``, ...), ``None`` before the first sample.
        """
        return self.script(_READ_TILES)

    def latest(self, chart: str) -> dict:
        """
        :return: the last values chart ``chart-<chart>`` drew, by series.
        """
        return json.loads(
            self.script("return document.getElementById(arguments[0]).dataset.latest || '{}';", "chart-" + chart)
        )

    def fill(self, element_id: str, text: str) -> None:
        field = self.driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(text)

    def submit(self, form_id: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, "#{} button[type=submit]".format(form_id)).click()

    def action_result(self) -> dict:
        """
        :return: what the last action said: ``{state, text}``.
        """
        return self.script(
            "const r = document.getElementById('action-result');"
            " return {state: r.dataset.state || '', text: r.textContent};"
        )

    def wait_for_action(self, state: str = "ok") -> str:
        """
        Wait until the last action is over in ``state``; return what it said.
        """
        return self.wait(
            lambda d: self.action_result()["state"] == state and self.action_result()["text"],
            "the action to end {}".format(state),
        )

    def status_of(self, path: str) -> object:
        """
        :return: the HTTP status of a keyless ``fetch(path)`` from the page.
        """
        return self.driver.execute_async_script(_FETCH_STATUS, path)

    def resources(self) -> list:
        """
        :return: the address of everything the page has loaded, from the
            browser's own list.
        """
        return self.script(
            "return performance.getEntriesByType('navigation').concat("
            "performance.getEntriesByType('resource')).map((e) => e.name);"
        )

    def describe(self) -> str:
        return "status: {}\nscope: {}\ntiles: {}\nsign-in error: {!r}\naction: {}\nconsole: {}".format(
            self.status(),
            self.text_of("scope"),
            self.tiles(),
            self.text_of("sign-in-error"),
            self.action_result(),
            self.console_errors(),
        )


class DashboardPageTests(PageTestCase):
    """
    The dashboard of a server with an API key, shown by headless chromium.
    """

    page_class = AdminPage

    def server_arguments(self):
        return ("--api-key-file", key_file(self))

    @property
    def admin_url(self) -> str:
        return self.url + "admin"

    @inlineCallbacks
    def open(self):
        yield deferToThread(self.page.open_signed_in, self.admin_url)

    def wait(self, condition, what: str):
        return deferToThread(self.page.wait, lambda driver: condition(), what)

    @inlineCallbacks
    def test_refuses_without_the_key(self):
        """Without a key the page shows only its sign-in form, and the data
        endpoints refuse the browser; a wrong key is refused, kept nowhere,
        and shows nothing."""
        page = self.page
        yield deferToThread(page.driver.get, self.admin_url)
        self.assertTrue((yield deferToThread(page.shown, "sign-in")))
        self.assertFalse((yield deferToThread(page.shown, "dashboard")))
        self.assertEqual((yield deferToThread(page.status))["state"], "signed-out")
        for path in ("/admin/stream", "/admin/nodes", "/api/rooms/lobby/presence"):
            self.assertEqual((yield deferToThread(page.status_of, path)), 401, path)

        yield deferToThread(page.sign_in, OTHER_KEY)
        yield self.wait(
            lambda: page.text_of("sign-in-error") == "That key is not accepted.", "the refusal"
        )
        self.assertFalse((yield deferToThread(page.shown, "dashboard")))
        self.assertIsNone((yield deferToThread(page.script, "return sessionStorage.getItem('broadcaster.admin.key');")))
        source = yield deferToThread(lambda: page.driver.page_source)
        self.assertNotIn(self.service.hub.node_id, source)
        self.assertEqual(len(self.service.dashboard.feed), 0)

    @inlineCallbacks
    def test_connections_and_message_rate_rise(self):
        """Signed in, the connections figure and chart follow clients as
        they connect, and the message rate rises while a client publishes;
        the key stays in the tab (not in the address) across a reload."""
        page = self.page
        yield self.open()
        yield self.wait(lambda: page.tiles()["connections"] == 0, "no connections yet")

        clients = []
        for _ in range(3):
            clients.append((yield join_chat(self, self.port))[0])
        yield self.wait(lambda: page.tiles()["connections"] == 3, "3 connections shown")
        yield self.wait(
            lambda: page.latest("connections").get("total") == 3 and page.latest("connections").get("json") == 3,
            "the connections chart at 3 (json)",
        )
        self.assertEqual(page.latest("messages")["messages_in"], 0)

        talker = clients[0]
        said = []

        def say():
            said.append(len(said))
            talker.send_json({"type": "message", "text": "tick {}".format(len(said))})

        publishing = LoopingCall(say)
        publishing.clock = reactor
        publishing.start(0.05)
        self.addCleanup(lambda: publishing.running and publishing.stop())
        yield self.wait(lambda: (page.tiles()["messages"] or 0) >= 5, "the message rate up")
        yield self.wait(
            lambda: page.latest("messages").get("messages_in", 0) > 0
            and page.latest("deliveries").get("deliveries", 0) > 0,
            "the message and delivery charts up",
        )
        publishing.stop()
        yield self.wait(lambda: page.tiles()["messages"] == 0, "the message rate back to 0")

        address = yield deferToThread(lambda: page.driver.current_url)
        self.assertNotIn(KEY, address)
        yield deferToThread(page.driver.refresh)
        yield self.wait(lambda: page.status()["state"] == "live", "live again after a reload")
        for client in clients:
            yield close_client(client)
        yield self.wait(lambda: page.tiles()["connections"] == 0, "the connections gone")

    @inlineCallbacks
    def test_disconnect_closes_the_client(self):
        """Disconnecting a client from the page closes it with close code
        4003 and the reason typed."""
        client, welcome = yield join_chat(self, self.port)
        yield self.open()
        page = self.page
        yield deferToThread(page.fill, "disconnect-target", welcome["id"])
        yield deferToThread(page.fill, "disconnect-reason", "cleaning up")
        yield deferToThread(page.submit, "disconnect-form")
        clean, code, reason = yield client.closed
        self.assertEqual((code, reason), (4003, "cleaning up"))
        said = yield deferToThread(page.wait_for_action)
        self.assertIn("1 connection", said)

    @inlineCallbacks
    def test_an_announcement_reaches_the_room(self):
        """An announcement from the page reaches a client in that room, from the server."""
        client, _ = yield join_chat(self, self.port)
        client.send_json({"type": "join", "room": "ops"})
        yield read_until(client, of_type("presence", room="ops"))
        yield self.open()
        page = self.page
        yield deferToThread(page.fill, "announce-room", "ops")
        yield deferToThread(page.fill, "announce-text", "Maintenance at noon")
        yield deferToThread(page.submit, "announce-form")
        message = (yield read_until(client, of_type("message", room="ops")))[-1]
        self.assertEqual((message["text"], message["from"]), ("Maintenance at noon", "server"))
        yield deferToThread(page.wait_for_action)

    @inlineCallbacks
    def test_rooms_members_and_history(self):
        """The busiest rooms are listed; a room opened shows its members
        and what was said there."""
        client, welcome = yield join_chat(self, self.port, "ann")
        client.send_json({"type": "join", "room": "dev"})
        yield read_until(client, of_type("presence", room="dev"))
        client.send_json({"type": "message", "room": "dev", "text": "hello dev"})
        yield read_until(client, of_type("message", room="dev"))
        yield self.open()
        page = self.page
        rooms = "return Array.from(document.querySelectorAll('#rooms-by-members tr[data-room]'), (r) => r.dataset.room);"
        yield self.wait(lambda: "dev" in page.script(rooms), "dev among the busiest rooms")
        yield deferToThread(
            lambda: page.driver.find_element(By.CSS_SELECTOR, "#rooms-by-members tr[data-room=dev] button").click()
        )
        members = "return Array.from(document.querySelectorAll('#room-members li[data-id]'), (li) => li.dataset.id);"
        yield self.wait(lambda: page.script(members) == [welcome["id"]], "ann among dev's members")
        history = "return Array.from(document.querySelectorAll('#room-history .text'), (e) => e.textContent);"
        yield self.wait(lambda: page.script(history) == ["hello dev"], "dev's history")

    @inlineCallbacks
    def test_loads_nothing_from_another_origin(self):
        """Everything the page loads, by the browser's own list, comes from
        the server's origin, and nothing breaks its content policy."""
        yield self.open()
        page = self.page
        yield deferToThread(page.fill, "room-name", "lobby")
        yield deferToThread(page.submit, "room-form")
        yield self.wait(
            lambda: any("/api/rooms/lobby/history" in name for name in page.resources()),
            "the room's history fetched",
        )
        origin = self.url.rstrip("/")
        loaded = yield deferToThread(page.resources)
        self.assertTrue(loaded)
        foreign = [name for name in loaded if not name.startswith(origin + "/")]
        self.assertEqual(foreign, [])
        errors = yield deferToThread(page.console_errors)
        self.assertEqual(errors, [])



class ShardedDashboardTests(PageTestCase):
    """
    The dashboard of a node over two standalone Redis servers shows each
    one, and which is unreachable.
    """

    page_class = AdminPage

    @inlineCallbacks
    def setUp(self):
        from tests.redis.test_redis import redis_servers

        self.servers = yield redis_servers(self, 2)
        yield super().setUp()

    def server_arguments(self):
        return (
            "--api-key-file", key_file(self),
            "--redis", self.servers[0].url, "--redis", self.servers[1].url,
        )

    def backplane(self) -> str:
        """The backplane's facts as the Nodes section lists them, term and
        value on a line each (shown or not)."""
        return self.page.script(
            "return Array.from(document.querySelectorAll('#backplane dt, #backplane dd'))"
            ".map((e) => e.textContent).join('\\n');"
        )

    @inlineCallbacks
    def test_each_redis_server_is_shown(self):
        """Both servers are listed by address, without their password;
        the one killed is shown unreachable, the other not."""
        from tests.redis.test_redis import PASSWORD

        page = self.page
        yield deferToThread(page.open_signed_in, self.url + "admin")
        addresses = ["127.0.0.1:{}/0".format(s.port) for s in self.servers]
        shown = yield deferToThread(
            page.wait,
            lambda driver: all(a in self.backplane() for a in addresses) and self.backplane(),
            "both servers listed",
        )
        self.assertIn("Server 1 of 2", shown)
        self.assertNotIn("unreachable", shown)
        yield self.servers[1].kill()
        shown = yield deferToThread(
            page.wait,
            lambda driver: "unreachable" in self.backplane() and self.backplane(),
            "the killed server shown unreachable",
        )
        self.assertNotIn(PASSWORD, shown)
        values = [line for line in shown.splitlines() if "127.0.0.1" in line]
        self.assertEqual(["unreachable" in line for line in values], [False, True], shown)
