"""
Tests for :mod:`broadcaster.core.history`: sequence numbers, kept messages and
what a reconnecting client can be told.
"""

from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.history import Histories, RoomHistory


def filled(size, count):
    history = RoomHistory(size, epoch="e")
    for _ in range(count):
        seq = history.next_seq()
        history.record(seq, "m{}".format(seq))
    return history


class RoomHistoryTests(SynchronousTestCase):
    def test_sequence_counts_even_without_history(self):
        """With size 0 nothing is kept but messages are still numbered."""
        history = filled(0, 3)
        self.assertEqual(history.seq, 3)
        self.assertEqual(history.last(10), [])

    def test_after_within_history_is_complete(self):
        """Everything after a kept seq comes back, complete."""
        self.assertEqual(filled(5, 8).after("e", 5), (["m6", "m7", "m8"], True))

    def test_after_the_oldest_kept_message_is_complete(self):
        """A client that saw the message just before the oldest kept one missed nothing forgotten."""
        self.assertEqual(filled(5, 8).after("e", 3), (["m4", "m5", "m6", "m7", "m8"], True))

    def test_after_beyond_history_is_incomplete(self):
        """A gap older than the history returns what is kept, incomplete."""
        self.assertEqual(filled(5, 8).after("e", 2), (["m4", "m5", "m6", "m7", "m8"], False))

    def test_up_to_the_join(self):
        """upto stops the answer at the messages already delivered live."""
        self.assertEqual(filled(5, 8).after("e", 5, upto=7), (["m6", "m7"], True))
        self.assertEqual(filled(5, 8).after("e", 7, upto=7), ([], True))

    def test_other_epoch_is_incomplete(self):
        """Another epoch gets everything kept, incomplete."""
        self.assertEqual(filled(2, 3).after("old", 3), (["m2", "m3"], False))

    def test_nothing_missed(self):
        """Up to date is complete and empty, even with no history kept."""
        self.assertEqual(filled(0, 3).after("e", 3), ([], True))
        self.assertEqual(filled(0, 3).after("e", 2), ([], False))


class HistoriesTests(SynchronousTestCase):
    def test_occupied_rooms_are_never_forgotten(self):
        """Only rooms nobody is in are evicted, least recently used first."""
        occupied = {"a"}
        histories = Histories(10, max_rooms=2, in_use=lambda room: room in occupied)
        a = histories.get("a")
        histories.get("b")
        histories.get("c")
        self.assertEqual(sorted(histories), ["a", "c"])
        self.assertIs(histories.get("a"), a)
        histories.get("d")
        self.assertEqual(sorted(histories), ["a", "d"])
