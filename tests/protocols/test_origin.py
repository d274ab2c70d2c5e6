"""
Tests for :mod:`broadcaster.protocols.origin`: which browser Origins may open a socket.
"""

from twisted.trial.unittest import SynchronousTestCase

from broadcaster.protocols.origin import OriginPolicy, own_origin, parse_origin


class ParseOriginTests(SynchronousTestCase):
    def test_normalises_case_and_default_ports(self) -> None:
        """Scheme and host are lower-cased and the default port made explicit."""
        self.assertEqual(parse_origin("HTTPS://Example.COM"), ("https", "example.com", 443))
        self.assertEqual(parse_origin("http://a.b:8080"), ("http", "a.b", 8080))

    def test_websocket_schemes_are_http_origins(self) -> None:
        """ws and wss name the same origins as http and https."""
        self.assertEqual(parse_origin("wss://a.b"), parse_origin("https://a.b:443"))

    def test_opaque_and_garbage_origins(self) -> None:
        """'null', relative and unknown-scheme origins are not origins."""
        for value in ("null", "", "example.com", "file:///x", "http://a.b:99999"):
            self.assertIsNone(parse_origin(value), value)

    def test_own_origin_follows_host_and_tls(self) -> None:
        """The server's origin is the Host header with the connection's scheme."""
        self.assertEqual(own_origin("localhost:9999", False), ("http", "localhost", 9999))
        self.assertEqual(own_origin("chat.example", True), ("https", "chat.example", 443))
        self.assertIsNone(own_origin(None, False))


class OriginPolicyTests(SynchronousTestCase):
    def test_scripts_without_origin_are_accepted(self) -> None:
        """No Origin header means no browser, so nothing to protect against."""
        self.assertTrue(OriginPolicy().permits(None, "localhost:9999", False))

    def test_own_origin_is_accepted(self) -> None:
        """The page served by this server may connect back to it."""
        policy = OriginPolicy()
        self.assertTrue(policy.permits("http://localhost:9999", "localhost:9999", False))
        self.assertTrue(policy.permits("https://chat.example", "chat.example:443", True))

    def test_foreign_origin_is_refused(self) -> None:
        """Another site, another port or another scheme is refused by default."""
        policy = OriginPolicy()
        self.assertFalse(policy.permits("http://evil.example", "localhost:9999", False))
        self.assertFalse(policy.permits("http://localhost:8000", "localhost:9999", False))
        self.assertFalse(policy.permits("http://chat.example", "chat.example", True))
        self.assertFalse(policy.permits("null", "localhost:9999", False))

    def test_allowed_origins_widen_the_policy(self) -> None:
        """--allow-origin adds exactly the origins named."""
        policy = OriginPolicy(["https://app.example"])
        self.assertTrue(policy.permits("https://app.example:443", "localhost:9999", False))
        self.assertFalse(policy.permits("http://app.example", "localhost:9999", False))

    def test_star_allows_every_origin(self) -> None:
        """'*' accepts any Origin, even an opaque one."""
        policy = OriginPolicy(["*"])
        self.assertTrue(policy.permits("http://evil.example", "localhost:9999", False))
        self.assertTrue(policy.permits("null", "localhost:9999", False))
