"""
Tests for :mod:`broadcaster.core.names`: which room and display names are allowed.
"""

from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.names import InvalidName, check_display_name, check_room, check_user_id


class CheckRoomTests(SynchronousTestCase):
    def test_valid_rooms(self):
        """Letters, digits, '_', '.' and '-' up to 64 characters are fine."""
        for room in ("lobby", "dev-2", "a.b_c", "9", "x" * 64):
            self.assertEqual(check_room(room), room)

    def test_invalid_rooms(self):
        """Empty, long, spaced, leading-punctuation and non-string names are refused."""
        for room in ("", "x" * 65, "a b", "-dev", ".", "caf\u00e9", None, 3):
            self.assertRaises(InvalidName, check_room, room)


class CheckDisplayNameTests(SynchronousTestCase):
    def test_trimmed(self):
        """Surrounding spaces go; inner ones and any script stay."""
        self.assertEqual(check_display_name("  Zo\u00eb  M.  ", 32), "Zo\u00eb  M.")

    def test_refused(self):
        """Empty, too long, control, bidi-override and line-separator names are refused."""
        for name in ("", "  ", "x" * 33, "a\x00b", "a\u202eb", "a\u2028b", "a\tb", 5):
            self.assertRaises(InvalidName, check_display_name, name, 32)


class CheckUserIdTests(SynchronousTestCase):
    def test_taken_as_given(self):
        for user in ("alice", "u-1842", "Zo\u00eb M.", "x" * 256):
            self.assertEqual(check_user_id(user, 256), user)

    def test_surrounding_white_space_is_refused_not_removed(self):
        """Subs that differ only by white space would otherwise be one user."""
        for user in (" alice", "alice\u00a0", "alice\t", "\u3000alice", "", 7, "a\x00b"):
            self.assertRaises(InvalidName, check_user_id, user, 256)
