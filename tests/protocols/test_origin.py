"""
Tests for :mod:`broadcaster.protocols.origin`: which browser Origins may open a
socket, and which Host names the server answers to (against DNS rebinding).
"""

from twisted.trial.unittest import SynchronousTestCase

from broadcaster.protocols.origin import (
    HostPolicy,
    OriginPolicy,
    allowed_host_name,
    host_name,
    is_loopback_name,
    own_origin,
    parse_origin,
)


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


class HostNameTests(SynchronousTestCase):
    def test_case_port_and_trailing_dot_do_not_matter(self):
        """A Host header is compared without its port, in lower case, with
        no trailing dot."""
        for header in ("Chat.Example", "chat.example:8080", "CHAT.EXAMPLE.:443", "chat.example:"):
            self.assertEqual(host_name(header), "chat.example", header)

    def test_ipv6_addresses_are_bracketed_and_canonical(self):
        """[::1], with or without a port and however it is spelt, is ::1."""
        for header in ("[::1]", "[::1]:9999", "[0:0:0:0:0:0:0:1]:80", " [::1] "):
            self.assertEqual(host_name(header), "::1", header)
        self.assertEqual(host_name("127.0.0.1:9999"), "127.0.0.1")

    def test_malformed_hosts_name_nothing(self):
        """What is not host[:port] names no host: it can match no allowed name."""
        for header in (
            "", ":80", "::1", "[::1", "[::1]x", "[127.0.0.1]", "[v1.x]", "a.example:x",
            "a..example", "a example", "a/b", "user@a.example", "\u00e9.example",
            "evil.example\x00", "localhost:80:80",
        ):
            self.assertIsNone(host_name(header), header)

    def test_allowed_names_take_no_port_scheme_or_path(self):
        """--allow-host takes names and addresses, bracketed or not for IPv6."""
        self.assertEqual(allowed_host_name("Chat.Example."), "chat.example")
        self.assertEqual(allowed_host_name("[::1]"), "::1")
        self.assertEqual(allowed_host_name("2001:DB8::1"), "2001:db8::1")
        self.assertEqual(allowed_host_name("10.0.0.5"), "10.0.0.5")
        for value in ("", " ", "chat.example:443", "http://chat.example", "a/b", "a b", "*", "[x]"):
            self.assertIsNone(allowed_host_name(value), value)

    def test_loopback_names(self):
        """localhost, names under .localhost and loopback addresses are
        loopback names; nothing else is."""
        for name in ("localhost", "app.localhost", "127.0.0.1", "127.0.0.2", "::1", "::ffff:7f00:1"):
            self.assertTrue(is_loopback_name(name), name)
        for name in ("localhost.example", "notlocalhost", "evil.example", "0.0.0.0", "::", "10.0.0.1"):
            self.assertFalse(is_loopback_name(name), name)


class HostPolicyTests(SynchronousTestCase):
    def test_beyond_loopback_without_names_any_host_is_answered(self):
        """With no --allow-host, a server listening beyond loopback answers
        to any name, as before."""
        policy = HostPolicy()
        self.assertTrue(policy.open)
        self.assertTrue(policy.permits("evil.example"))

    def test_loopback_answers_only_loopback_names(self):
        """On loopback the rebinding page's name is refused, and the names
        a local browser uses are answered, on any port."""
        policy = HostPolicy(loopback=True)
        self.assertFalse(policy.open)
        for header in ("localhost:9999", "127.0.0.1:9999", "[::1]:9999", "LOCALHOST.", "chat.localhost:8"):
            self.assertTrue(policy.permits(header), header)
        for header in ("evil.example", "evil.example:9999", "localhost.evil.example", "0.0.0.0:9999", ""):
            self.assertFalse(policy.permits(header), header)

    def test_allowed_names_are_the_only_ones_beyond_loopback(self):
        """With --allow-host and beyond loopback only the names given are
        answered, loopback names included."""
        policy = HostPolicy(["Chat.Example", "[2001:db8::1]"])
        self.assertTrue(policy.permits("chat.example:443"))
        self.assertTrue(policy.permits("[2001:DB8:0::1]:9999"))
        for header in ("evil.example", "localhost", "127.0.0.1", "app.chat.example"):
            self.assertFalse(policy.permits(header), header)

    def test_on_loopback_allowed_names_add_to_the_loopback_names(self):
        """With --allow-host on loopback (behind a local proxy, say) the
        loopback names are still answered."""
        policy = HostPolicy(["chat.example"], loopback=True)
        for header in ("chat.example", "localhost:9999", "[::1]"):
            self.assertTrue(policy.permits(header), header)
        self.assertFalse(policy.permits("evil.example"))

    def test_verdicts_are_remembered_within_a_bound(self):
        """
        Verdicts are kept for the next request naming the same host, but
        a client naming ever new hosts cannot grow them past their bound,
        and a verdict asked again after they were forgotten is the same.
        """
        policy = HostPolicy(loopback=True)
        for n in range(3 * HostPolicy.REMEMBERED):
            self.assertFalse(policy.permits("evil{}.example".format(n)))
            self.assertTrue(policy.permits("127.0.0.1:{}".format(n)))
            self.assertLessEqual(policy._verdict.cache_info().currsize, HostPolicy.REMEMBERED)
        self.assertFalse(policy.permits("evil0.example"))
        self.assertTrue(policy.permits("localhost"))

    def test_a_bad_name_is_refused(self):
        """A name that is not one cannot be allowed by mistake."""
        self.assertRaises(ValueError, HostPolicy, ["chat.example:443"])
