"""
Tests for :mod:`broadcaster.core.permissions` and for the hub keeping to
them: who may do what in which room.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.events import Joined, Left, Renamed, TextMessage
from broadcaster.core.hub import Hub, NotInRoom
from broadcaster.core.permissions import (
    EVERYTHING,
    HISTORY,
    JOIN,
    PRESENCE,
    PUBLISH,
    RIGHTS,
    Forbidden,
    parse_grants,
)
from tests.core.test_hub import RecordingMember
from tests.support import immediate_hub

#: The support desk of the docs: a customer sees only their own room.
CUSTOMER = {"support-u1842": ["join", "publish", "history"], "announcements": ["join", "history"]}


class GrantsTests(SynchronousTestCase):
    def test_no_rooms_is_everything(self):
        """Without "rooms" every right is granted everywhere, as before."""
        grants = parse_grants(None)
        self.assertIs(grants, EVERYTHING)
        self.assertEqual(grants.listed("anything"), list(RIGHTS))

    def test_a_list_grants_every_right(self):
        grants = parse_grants(["lobby", "team-*"])
        self.assertEqual(grants.listed("lobby"), list(RIGHTS))
        self.assertEqual(grants.listed("team-finance"), list(RIGHTS))
        self.assertEqual(grants.listed("team-"), list(RIGHTS))
        self.assertEqual(grants.listed("teams"), [])
        self.assertEqual(grants.listed("lobby2"), [])

    def test_rights_by_room(self):
        grants = parse_grants(CUSTOMER)
        self.assertEqual(grants.listed("support-u1842"), [JOIN, PUBLISH, HISTORY])
        self.assertEqual(grants.listed("announcements"), [JOIN, HISTORY])
        self.assertEqual(grants.listed("support-u1843"), [])
        self.assertEqual(grants.listed("lobby"), [])

    def test_matching_entries_add_up(self):
        grants = parse_grants({"team-*": ["join"], "team-finance": ["publish"], "t*": ["presence"]})
        self.assertEqual(grants.listed("team-finance"), [JOIN, PUBLISH, PRESENCE])
        self.assertEqual(grants.listed("team-x"), [JOIN, PRESENCE])

    def test_without_join_nothing(self):
        """Every right needs join: one cannot publish to a room one cannot be in."""
        grants = parse_grants({"news": ["publish", "history"]})
        self.assertEqual(grants.listed("news"), [])
        self.assertFalse(grants.allows("news", PUBLISH))

    def test_empty_is_nothing(self):
        for value in ([], {}):
            self.assertEqual(parse_grants(value).listed("lobby"), [])

    def test_refusals_name_the_right_and_room(self):
        grants = parse_grants(CUSTOMER)
        error = self.assertRaises(Forbidden, grants.check, "announcements", PUBLISH)
        self.assertEqual(str(error), "not allowed to publish in room 'announcements'")

    def test_bad_rooms_are_refused_with_a_reason(self):
        for value, reason in (
            ("lobby", "must be a list"),
            ([1], "a name or pattern"),
            ([""], "a name or pattern"),
            (["x" * 66], "a name or pattern"),
            (["a*b"], "may only end"),
            ({"lobby": ["join", "admin"]}, "unknown right 'admin'"),
            ({"lobby": "all"}, "must be a list"),
            (["r{}".format(i) for i in range(1001)], "more than 1000"),
        ):
            error = self.assertRaises(ValueError, parse_grants, value)
            self.assertIn(reason, str(error))


class HubKeepsToGrantsTests(SynchronousTestCase):
    """Every request is checked by the hub, for every kind of client."""

    def setUp(self):
        self.hub = immediate_hub(Clock(), node_id="t")
        self.staff = RecordingMember("t-staff", "staff")
        self.hub.connect(self.staff)
        self.customer = RecordingMember("t-cust", "cust")
        self.customer.grants = parse_grants(CUSTOMER)
        self.hub.connect(self.customer)

    def test_no_lobby_without_the_right(self):
        """A member that may not join the lobby is connected outside it:
        it neither hears nor is announced there."""
        self.assertEqual(self.hub.rooms_of(self.customer.id), [])
        self.assertEqual([m.id for m in self.hub.room_members("lobby")], ["t-staff"])
        self.hub.publish_text("t-staff", "lobby talk")
        self.assertEqual(self.customer.texts(), [])

    def test_join(self):
        self.hub.join(self.customer, "support-u1842")
        error = self.assertRaises(Forbidden, self.hub.join, self.customer, "support-u1843")
        self.assertEqual(str(error), "not allowed to join room 'support-u1843'")
        self.assertEqual(self.hub.rooms_of(self.customer.id), ["support-u1842"])

    def test_publish(self):
        self.hub.join(self.customer, "announcements")
        self.hub.join(self.staff, "announcements")
        self.assertRaises(Forbidden, self.hub.publish_text, "t-cust", "hi all", "announcements")
        self.hub.publish_text("t-staff", "opening hours", "announcements")
        self.assertEqual(self.customer.texts(), [("announcements", "opening hours")])
        self.assertRaises(Forbidden, self.hub.publish_binary, "t-cust", b"x")
        self.assertRaises(Forbidden, self.hub.publish_image, "t-cust", b"png", 1, 1)
        self.assertRaises(Forbidden, self.hub.check, "t-cust", "lobby", PUBLISH)

    def test_history_presence_and_replay(self):
        self.hub.join(self.customer, "support-u1842")
        self.hub.publish_text("t-cust", "help", "support-u1842")
        self.successResultOf(self.hub.history("t-cust", "support-u1842", 10))
        error = self.assertRaises(Forbidden, self.hub.who, "t-cust", "support-u1842")
        self.assertEqual(str(error), "not allowed to see who is in room 'support-u1842'")
        self.hub.join(self.customer, "announcements")
        self.successResultOf(self.hub.replay(self.customer, "announcements", "x", 0))
        noread = RecordingMember("t-noread", "n")
        noread.grants = parse_grants({"quiet": ["join"]})
        self.hub.connect(noread)
        self.hub.join(noread, "quiet")
        self.assertRaises(Forbidden, self.hub.history, "t-noread", "quiet", 10)
        self.assertRaises(Forbidden, self.hub.replay, noread, "quiet", "x", 0)
        # Membership is still checked first.
        self.assertRaises(NotInRoom, self.hub.history, "t-noread", "support-u1842", 10)
        self.assertEqual(
            [e.text for e in self.customer.events if isinstance(e, TextMessage)], ["help"]
        )


class PresenceRightTests(SynchronousTestCase):
    """Who comes and goes in a room is told only to its members with the
    presence right there."""

    def setUp(self):
        self.clock = Clock()
        self.hub = Hub(self.clock, node_id="t")
        self.hub.fanout.timer = lambda: 0.0
        self.staff = RecordingMember("t-staff", "staff")
        self.hub.connect(self.staff)
        self.customer = RecordingMember("t-cust", "cust")
        self.customer.grants = parse_grants(CUSTOMER)
        self.hub.connect(self.customer)
        self.hub.join(self.customer, "announcements")
        self.hub.join(self.staff, "announcements")
        self.clock.advance(0)

    def comings(self, member, room="announcements"):
        return [
            (type(e).__name__, e.member)
            for e in member.events
            if isinstance(e, (Joined, Left, Renamed)) and e.room == room
        ]

    def test_members_without_it_hear_messages_but_not_who_comes(self):
        bob = RecordingMember("t-bob", "bob")
        self.hub.connect(bob)
        self.hub.join(bob, "announcements")
        self.hub.publish_text("t-staff", "hello", "announcements")
        bob.name = "Bobby"
        self.hub.rename(bob)
        self.hub.leave(bob, "announcements")
        self.clock.advance(0)
        self.assertEqual(self.customer.texts(), [("announcements", "hello")])
        self.assertEqual(self.comings(self.customer), [])
        self.assertEqual(
            self.comings(self.staff),
            [
                ("Joined", "t-cust"),
                ("Joined", "t-staff"),
                ("Joined", "t-bob"),
                ("Renamed", "t-bob"),
                ("Left", "t-bob"),
            ],
        )

    def test_a_refresh_can_give_and_take_it(self):
        seeing = parse_grants({**CUSTOMER, "announcements": ["join", "presence"]})
        self.assertEqual(self.hub.regrant(self.customer, seeing), [])
        bob = RecordingMember("t-bob", "bob")
        self.hub.connect(bob)
        self.hub.join(bob, "announcements")
        self.clock.advance(0)
        self.assertEqual(self.comings(self.customer), [("Joined", "t-bob")])
        self.assertEqual(self.hub.regrant(self.customer, parse_grants(CUSTOMER)), [])
        self.hub.leave(bob, "announcements")
        self.clock.advance(0)
        self.assertEqual(self.comings(self.customer), [("Joined", "t-bob")])
        left = self.hub.regrant(self.customer, parse_grants({"support-*": ["join"]}))
        self.assertEqual(left, ["announcements"])
