"""
Tests for :mod:`broadcaster.core.moderation` and the hub carrying it out:
bans driven by a :class:`~twisted.internet.task.Clock`, expulsions read
from their fields, and members closed by them.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.members import MemberBase
from broadcaster.core.moderation import (
    DEFAULT_REASON,
    Bans,
    Expulsion,
    InvalidExpulsion,
    parse_expulsion,
)
from tests.support import immediate_hub


class BansTests(SynchronousTestCase):
    def test_a_ban_ends_after_its_seconds(self):
        """A banned user is refused for the ban's seconds, then not, and forgotten."""
        clock = Clock()
        bans = Bans(clock)
        bans.ban("u-ann", 60)
        self.assertEqual(bans.remaining("u-ann"), 60)
        self.assertEqual(bans.remaining("u-bob"), 0)
        clock.advance(59.5)
        self.assertEqual(bans.remaining("u-ann"), 0.5)
        clock.advance(0.5)
        self.assertEqual(bans.remaining("u-ann"), 0)
        self.assertEqual(len(bans), 0)

    def test_the_later_end_wins(self):
        """Banning a banned user again keeps the later of the two ends."""
        clock = Clock()
        bans = Bans(clock)
        bans.ban("u-ann", 600)
        bans.ban("u-ann", 10)
        self.assertEqual(bans.remaining("u-ann"), 600)
        bans.ban("u-ann", 900)
        self.assertEqual(bans.remaining("u-ann"), 900)

    def test_ended_bans_are_forgotten_as_new_ones_come(self):
        """Bans that ended do not pile up: the next ban sweeps them."""
        clock = Clock()
        bans = Bans(clock)
        for i in range(100):
            bans.ban("u-{}".format(i), 1)
        clock.advance(2)
        bans.ban("u-new", 1)
        self.assertEqual(len(bans), 1)


class ParseTests(SynchronousTestCase):
    def test_a_user_or_a_client(self):
        """A user (stripped, as sign-in names them) or a client id, with defaults."""
        self.assertEqual(
            parse_expulsion({"user": " u-ann "}, by="1a2b3c4d"),
            Expulsion(user="u-ann", reason=DEFAULT_REASON, by="1a2b3c4d"),
        )
        self.assertEqual(
            parse_expulsion({"client": "n1-7", "reason": "bye", "user": None}),
            Expulsion(client="n1-7", reason="bye"),
        )

    def test_fields_read_back(self):
        """An expulsion's fields read back as the same expulsion (how nodes pass it on)."""
        expulsion = Expulsion(user="u-ann", reason="spam", ban_seconds=600, by="1a2b3c4d")
        self.assertEqual(parse_expulsion(expulsion.fields(), by="1a2b3c4d"), expulsion)

    def test_a_reason_fits_a_close_frame(self):
        """A reason of 123 UTF-8 bytes is accepted; 124 are not."""
        parse_expulsion({"user": "u", "reason": "é" * 61 + "x"})
        self.assertRaises(InvalidExpulsion, parse_expulsion, {"user": "u", "reason": "é" * 62})


class Recorder(MemberBase):
    """A member that records being expelled."""

    def __init__(self, member_id, user=None):
        self.id = member_id
        self.name = member_id
        self.user = user
        self.expelled = []

    def deliver(self, event):
        pass

    def expel(self, reason):
        self.expelled.append(reason)
        return True


class HubTests(SynchronousTestCase):
    def test_expel_closes_the_named_members_and_bans(self):
        """The hub closes the user's members with the reason, bans the user
        and answers the count; other members are untouched."""
        clock = Clock()
        hub = immediate_hub(clock)
        ann1, ann2, bob = Recorder("n-1", "u-ann"), Recorder("n-2", "u-ann"), Recorder("n-3")
        for member in (ann1, ann2, bob):
            hub.connect(member)
        result = hub.expel(Expulsion(user="u-ann", reason="spam", ban_seconds=30))
        self.assertEqual(self.successResultOf(result), (2, True))
        self.assertEqual((ann1.expelled, ann2.expelled, bob.expelled), (["spam"], ["spam"], []))
        self.assertEqual(hub.banned("u-ann"), 30)
        clock.advance(30)
        self.assertEqual(hub.banned("u-ann"), 0)
        self.assertEqual(self.successResultOf(hub.expel(Expulsion(client="n-3"))), (1, True))
        self.assertEqual(bob.expelled, [DEFAULT_REASON])
