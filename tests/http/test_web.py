"""
Tests for :mod:`broadcaster.http.site`: the page, its assets and ``/healthz`` over
real HTTP, on the same port as the WebSocket endpoint.
"""

import json

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.support import connect_plain_clients, start_server


class SiteTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.service, self.port = yield start_server(self)
        self.base = "http://127.0.0.1:{}".format(self.port)

    @inlineCallbacks
    def get(self, path, **kwargs):
        response = yield treq.get(self.base + path, persistent=False, **kwargs)
        body = yield response.content()
        return response, body

    @inlineCallbacks
    def test_root_serves_the_chat_page(self):
        """A plain GET / returns the HTML page with a strict content policy."""
        response, body = yield self.get("/")
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders("content-type")[0].startswith("text/html")
        )
        self.assertIn(b"<html", body.lower())
        (csp,) = response.headers.getRawHeaders("content-security-policy")
        self.assertIn("default-src 'self'", csp)
        self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])

    @inlineCallbacks
    def test_page_with_query_string(self):
        """The page is served for /?name=ann too."""
        response, body = yield self.get("/?name=ann")
        self.assertEqual(response.code, 200)
        self.assertIn(b"<html", body.lower())

    @inlineCallbacks
    def test_page_assets_are_served(self):
        """Every file the page references under /static/ is served with its type."""
        _, page = yield self.get("/")
        for name, kind in [("chat.js", "javascript"), ("chat.css", "text/css")]:
            self.assertIn("/static/{}".format(name).encode(), page)
            response, body = yield self.get("/static/" + name)
            self.assertEqual(response.code, 200, name)
            self.assertIn(kind, response.headers.getRawHeaders("content-type")[0])
            self.assertTrue(body)

    @inlineCallbacks
    def test_unknown_paths_are_404(self):
        """Paths the server does not have answer 404."""
        for path in ("/nope", "/static/nope.js"):
            response, _ = yield self.get(path)
            self.assertEqual(response.code, 404, path)

    @inlineCallbacks
    def test_healthz_reports_status_and_connections(self):
        """/healthz is JSON with the status and the live connection count."""
        response, body = yield self.get("/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        health = json.loads(body)
        self.assertEqual((health["status"], health["connections"]), ("ok", 0))
        yield connect_plain_clients(self, self.port, 2)
        _, body = yield self.get("/healthz")
        self.assertEqual(json.loads(body)["connections"], 2)
