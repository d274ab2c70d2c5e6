"""
Tests for :mod:`broadcaster.service.tap`: the options ``twistd broadcaster`` takes and
the service ``makeService`` builds, and the plugin as an installed user sees it.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.service.listening import loopback_only, with_backlog
from broadcaster.service.tap import Options, makeService
from broadcaster.core.members import MemberBase


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        """With no arguments the server listens on tcp:9999 with safe limits,
        and a listen backlog that survives a reconnect storm."""
        options = parse()
        self.assertEqual(options["port"], "tcp:9999:backlog=1024")
        self.assertEqual(options["allow-origin"], [])
        self.assertEqual(options["max-message-size"], 65536)
        self.assertFalse(options["debug"])

    def test_listen_backlog_applies_where_none_is_given(self):
        """--listen-backlog goes to every tcp:, ssl: and unix: listener that
        names no backlog= of its own; other endpoint types are left alone."""
        options = parse(
            "--listen-backlog", "4096",
            "--port", "unix:/tmp/chat.sock",
            "--image-port", "tcp:9998:backlog=10",
            "--line-port", "none",
        )
        self.assertEqual(options["port"], "unix:/tmp/chat.sock:backlog=4096")
        self.assertEqual(options["image-port"], "tcp:9998:backlog=10")
        self.assertIsNone(options["line-port"])
        self.assertEqual(with_backlog("systemd:domain=INET:index=0", 5), "systemd:domain=INET:index=0")
        self.assertEqual(with_backlog("SSL:9443:privateKey=k.pem", 5), "SSL:9443:privateKey=k.pem:backlog=5")

    def test_allow_origin_is_repeatable(self):
        """--allow-origin collects every value given."""
        options = parse("--allow-origin", "https://a.example", "--allow-origin", "*")
        self.assertEqual(options["allow-origin"], ["https://a.example", "*"])

    def assertUsageError(self, fragment, *args):
        error = self.assertRaises(UsageError, parse, *args)
        self.assertIn(fragment, str(error))

    def test_bad_origin_names_the_flag(self):
        """An --allow-origin that is not an origin is refused, naming the flag."""
        self.assertUsageError("--allow-origin", "--allow-origin", "example.com")

    def test_allow_host_is_repeatable(self):
        """--allow-host collects every name given; by default there is none."""
        self.assertEqual(parse()["allow-host"], [])
        options = parse("--allow-host", "chat.example", "--allow-host", "[::1]")
        self.assertEqual(options["allow-host"], ["chat.example", "[::1]"])

    def test_bad_host_names_the_flag(self):
        """An --allow-host that is empty, or holds a space, a slash or a
        port, is refused, naming the flag."""
        for bad in ("", "chat example", "https://chat.example", "chat.example/", "chat.example:443"):
            self.assertUsageError("--allow-host {!r}".format(bad), "--allow-host", bad)

    def test_bad_port_names_the_flag(self):
        """An unparsable --port is refused, naming the flag."""
        self.assertUsageError("--port", "--port", "carrier-pigeon:9999")
        self.assertUsageError("--port", "--port", "tcp:notaport")
        self.assertUsageError("--image-port", "--image-port", "tcp:x")
        self.assertUsageError("--line-port", "--line-port", "udp:9")

    def test_missing_certificate_is_refused_at_start(self):
        """An ssl: port whose key file does not exist fails before start-up."""
        self.assertUsageError("--port", "--port", "ssl:9443:privateKey=/nonexistent.pem")

    def test_limits_must_be_positive(self):
        """Sizes and timeouts must be positive numbers; the error names the flag."""
        self.assertUsageError("--max-message-size '0': must be a positive integer",
                              "--max-message-size", "0")
        self.assertUsageError("--max-message-size 'lots': must be a positive integer",
                              "--max-message-size", "lots")
        self.assertUsageError("--open-handshake-timeout '-1': must be a positive number",
                              "--open-handshake-timeout", "-1")
        self.assertUsageError("--max-rooms '0'", "--max-rooms", "0")
        self.assertUsageError("--history-size '-1'", "--history-size", "-1")

    def test_history_memory(self):
        """--history-memory is a number of bytes, 256 MiB by default, and at
        least --max-message-size (so that it is not mistaken for MiB)."""
        self.assertEqual(parse()["history-memory"], 256 * 1024 * 1024)
        self.assertEqual(parse("--history-memory", "1000000")["history-memory"], 1000000)
        for bad in ("0", "-5", "256MiB"):
            self.assertUsageError(
                "--history-memory {!r}: must be a whole number of bytes above zero".format(bad),
                "--history-memory", bad,
            )
        self.assertUsageError(
            "--history-memory 256 is smaller than --max-message-size 65536",
            "--history-memory", "256",
        )
        self.assertEqual(
            parse("--history-memory", "256", "--max-message-size", "256")["history-memory"], 256
        )

    def test_node_id_is_checked(self):
        """--node-id accepts letters and digits only."""
        self.assertEqual(parse("--node-id", "web1")["node-id"], "web1")
        self.assertUsageError("--node-id", "--node-id", "a b")


class MakeServiceTests(SynchronousTestCase):
    def start(self, *args):
        reactor = MemoryReactorClock()
        service = makeService(parse(*args), reactor=reactor)
        self.assertEqual(reactor.tcpServers, [], "listened before start-up")
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service, reactor

    def test_listens_on_the_default_ports(self):
        """By default the WebSocket/page, image and line ports are 9999, 9998 and 9997."""
        service, reactor = self.start()
        ports = {(port, type(factory).__name__) for port, factory, _, _ in reactor.tcpServers}
        self.assertEqual(
            ports,
            {(9999, "BroadcasterSite"), (9998, "ImageFactory"), (9997, "LineBridgeFactory")},
        )
        self.assertEqual({backlog for _, _, backlog, _ in reactor.tcpServers}, {1024})

    def test_listens_where_the_options_say(self):
        """Each port option is an endpoint description, honoured with its interface."""
        service, reactor = self.start(
            "--port", "tcp:8080:interface=127.0.0.1", "--image-port", "tcp:8081",
            "--line-port", "tcp:8082:interface=127.0.0.2",
        )
        self.assertEqual(
            sorted((port, interface) for port, _, _, interface in reactor.tcpServers),
            [(8080, "127.0.0.1"), (8081, ""), (8082, "127.0.0.2")],
        )
        port = self.successResultOf(service.web_endpoint.when_listening())
        self.assertEqual(port.getHost().port, 8080)

    def test_none_disables_raw_tcp_ports(self):
        """'none' turns the image port and the line bridge off."""
        service, reactor = self.start("--image-port", "none", "--line-port", "NONE")
        self.assertEqual([port for port, _, _, _ in reactor.tcpServers], [9999])
        self.assertIsNone(service.image_endpoint)
        self.assertIsNone(service.line_endpoint)

    def test_host_policy_follows_the_port_and_allow_host(self):
        """A --port on loopback answers only loopback names, with
        --allow-host only those names too, and beyond loopback without
        --allow-host any name; a loopback --metrics-port only loopback
        names, whatever --allow-host says."""

        def policies(*args):
            service, reactor = self.start("--image-port", "none", "--line-port", "none", *args)
            return {port: factory.hosts for port, factory, _, _ in reactor.tcpServers}

        hosts = policies("--port", "tcp:9999")[9999]
        self.assertTrue(hosts.permits("evil.example"))
        hosts = policies("--port", "tcp:9999:interface=127.0.0.1")[9999]
        self.assertEqual((hosts.permits("evil.example"), hosts.permits("localhost:9999")), (False, True))
        hosts = policies("--port", "tcp:9999", "--allow-host", "chat.example")[9999]
        self.assertEqual((hosts.permits("evil.example"), hosts.permits("chat.example")), (False, True))
        found = policies(
            "--port", "tcp:9999:interface=127.0.0.1", "--allow-host", "chat.example",
            "--metrics-port", "tcp:9100:interface=127.0.0.1",
        )
        self.assertEqual([found[9999].permits(h) for h in ("chat.example", "[::1]")], [True, True])
        self.assertEqual([found[9100].permits(h) for h in ("chat.example", "[::1]")], [False, True])
        self.assertTrue(policies("--metrics-port", "tcp:9100")[9100].open)

    def test_loopback_only_reads_the_interface(self):
        """Only a tcp:, tcp6: or ssl: endpoint whose interface is a loopback
        address or localhost listens on loopback only."""
        for description in (
            "tcp:9999:interface=127.0.0.1", "tcp:9999:127.0.0.1", "tcp:0:interface=127.0.0.2",
            "tcp6:9999:interface=\\:\\:1", "tcp:9999:interface=localhost:backlog=5",
        ):
            self.assertTrue(loopback_only(description), description)
        for description in (
            "tcp:9999", "tcp6:9999", "tcp:9999:interface=0.0.0.0", "tcp:9999:interface=10.0.0.1",
            "unix:/tmp/chat.sock", "systemd:domain=INET:index=0",
        ):
            self.assertFalse(loopback_only(description), description)

    def test_history_memory_bounds_the_hub_s_history(self):
        """--history-memory is the in-process history's bound."""
        service = makeService(parse("--history-memory", "5000000"), reactor=MemoryReactorClock())
        self.assertEqual(service.hub.backplane.memory.limit, 5000000)

    def test_node_id_prefixes_client_ids(self):
        """Client ids carry the configured node id."""
        service = makeService(parse("--node-id", "web1"), reactor=MemoryReactorClock())
        self.assertEqual(service.hub.new_id(), "web1-1")


class PluginTests(SynchronousTestCase):
    def test_twistd_lists_the_plugin_outside_the_source_tree(self):
        """Run from another directory, twistd finds the installed plugin and its options.

        This checks the packaging: it passes only when broadcaster is
        installed (``pip install .``) so that the dropin is on sys.path."""
        twistd = shutil.which("twistd", path=os.path.dirname(sys.executable)) or shutil.which(
            "twistd"
        )
        self.assertIsNotNone(twistd, "twistd is not installed")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with tempfile.TemporaryDirectory() as elsewhere:
            result = subprocess.run(
                [twistd, "broadcaster", "--help"],
                cwd=elsewhere,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--port", "--allow-origin", "--max-message-size"):
            self.assertIn(option, result.stdout)


class FakeMember(MemberBase):
    """A member that records how the server asked it to go."""

    def __init__(self, hub, member_id, leaves_when_asked=True):
        self.id = member_id
        self.name = None
        self.hub = hub
        self.leaves_when_asked = leaves_when_asked
        self.calls = []

    def deliver(self, event):
        pass

    def shut_down(self):
        self.calls.append("shut_down")
        if self.leaves_when_asked:
            self.hub.disconnect(self)

    def abort(self):
        self.calls.append("abort")
        self.hub.disconnect(self)


class ShutdownTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.service = makeService(
            parse("--drain-timeout", "5", "--image-port", "none", "--line-port", "none"),
            reactor=self.reactor,
        )
        self.service.privilegedStartService()
        self.service.startService()

    def test_clients_are_asked_to_close_and_stop_waits_for_them(self):
        """Stopping closes every client politely and finishes once they are gone."""
        polite = FakeMember(self.service.hub, "a")
        slow = FakeMember(self.service.hub, "b", leaves_when_asked=False)
        self.service.hub.connect(polite)
        self.service.hub.connect(slow)
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.assertEqual((polite.calls, slow.calls), (["shut_down"], ["shut_down"]))
        self.service.hub.disconnect(slow)
        self.successResultOf(stopped)
        self.assertEqual(slow.calls, ["shut_down"])

    def test_clients_that_linger_are_dropped_after_the_drain_timeout(self):
        """A client still there after --drain-timeout is aborted and stop completes."""
        slow = FakeMember(self.service.hub, "b", leaves_when_asked=False)
        self.service.hub.connect(slow)
        stopped = self.service.stopService()
        self.reactor.advance(4.9)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(slow.calls, ["shut_down", "abort"])


class DescribeAddressTests(SynchronousTestCase):
    def test_addresses_read_like_endpoint_descriptions(self):
        """Listening addresses are logged the way --port is written."""
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        from broadcaster.service.listening import describe_address

        self.assertEqual(describe_address(IPv4Address("TCP", "0.0.0.0", 9999)), "tcp:0.0.0.0:9999")
        self.assertEqual(describe_address(IPv6Address("TCP", "::1", 9998)), "tcp:[::1]:9998")
        self.assertEqual(describe_address(UNIXAddress(b"/run/c.sock")), "unix:/run/c.sock")


class InOrderTests(SynchronousTestCase):
    def test_children_stop_one_at_a_time_in_reverse(self):
        """InOrder starts children in order and stops each only once the one
        added after it has finished stopping."""
        from twisted.application.service import Service
        from twisted.internet.defer import Deferred

        from broadcaster.service.tap import InOrder

        events = []

        class Child(Service):
            def __init__(self, name):
                self.name = name
                self.stopping = Deferred()

            def startService(self):
                super().startService()
                events.append(("start", self.name))

            def stopService(self):
                super().stopService()
                events.append(("stop", self.name))
                return self.stopping

        parent = InOrder()
        backplane, webhooks, clients = (Child(n) for n in ("backplane", "webhooks", "clients"))
        for child in (backplane, webhooks, clients):
            child.setServiceParent(parent)
        parent.startService()
        stopped = parent.stopService()
        self.assertEqual(events[-1], ("stop", "clients"))
        clients.stopping.callback(None)
        self.assertEqual(events[-1], ("stop", "webhooks"))
        webhooks.stopping.callback(None)
        self.assertNoResult(stopped)
        backplane.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(
            events,
            [("start", "backplane"), ("start", "webhooks"), ("start", "clients"),
             ("stop", "clients"), ("stop", "webhooks"), ("stop", "backplane")],
        )
