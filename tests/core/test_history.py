"""
Tests for :mod:`broadcaster.core.history`: sequence numbers, kept messages and
what a reconnecting client can be told.
"""

import random

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.history import EPISODE_QUIET, Histories, HistoryMemory, RoomHistory


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


def kept(history):
    """The messages a room keeps, oldest first."""
    return history.last(1000)


class MemoryTestCase(SynchronousTestCase):
    """
    Rooms sharing a :class:`HistoryMemory` whose messages are strings that
    cost their length, so budgets read in characters.
    """

    def setUp(self):
        self.clock = Clock()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def rooms(self, limit, size=100, max_rooms=100):
        self.memory = HistoryMemory(limit, self.clock, sizeof=len)
        self.histories = Histories(size, max_rooms, in_use=lambda room: False, memory=self.memory)
        return self.histories

    def say(self, room, *texts):
        history = self.histories.get(room)
        for text in texts:
            history.record(history.next_seq(), text)
        return history

    def history_logs(self):
        return [e for e in self.logged if e.get("log_format", "").startswith("[HISTORY]")]


class HistoryMemoryTests(MemoryTestCase):
    def test_the_rooms_that_keep_the_most_lose_their_oldest_first(self):
        """Past the budget, the largest rooms forget their oldest messages
        until every room fits, and a small quiet room keeps all of its own."""
        self.rooms(limit=100)
        quiet = self.say("quiet", "hello", "there")
        sent = [["{}{}".format(room, n) * 5 for n in range(5)] for room in range(4)]
        flood = [self.say("flood{}".format(room), *texts) for room, texts in enumerate(sent)]
        self.assertEqual(kept(quiet), ["hello", "there"])
        # 200 bytes of flood in 90: each flood room keeps its latest messages.
        self.assertEqual(sorted(len(kept(h)) for h in flood), [2, 2, 2, 3])
        for history, texts in zip(flood, sent):
            self.assertEqual(kept(history), texts[-len(kept(history)):])
        self.assertEqual((self.memory.used, self.memory.evicted), (100, 11))

    def test_a_replay_past_an_evicted_message_is_incomplete(self):
        """A message forgotten for the budget is forgotten as --history-size
        forgets one: the sequence goes on, and a replay that needed it says
        it is incomplete while one that did not is complete."""
        self.rooms(limit=30)
        room = self.say("r", "aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc")
        self.say("other", "x" * 9)
        self.assertEqual(kept(room), ["bbbbbbbbbb", "cccccccccc"])
        self.assertEqual(room.seq, 3)
        self.assertEqual(room.after(room.epoch, 0), (["bbbbbbbbbb", "cccccccccc"], False))
        self.assertEqual(room.after(room.epoch, 1), (["bbbbbbbbbb", "cccccccccc"], True))
        self.assertEqual(room.after(room.epoch, 3), ([], True))

    def test_a_room_emptied_by_the_budget_still_counts_and_answers(self):
        """A room whose every message was evicted keeps its sequence: a client
        that is up to date is complete, any other is told it is not."""
        self.rooms(limit=20)
        room = self.say("r", "a" * 15)
        self.say("other", "b" * 10)
        self.assertEqual((kept(room), room.seq, room.bytes), ([], 1, 0))
        self.assertEqual(room.after(room.epoch, 1), ([], True))
        self.assertEqual(room.after(room.epoch, 0), ([], False))

    def test_a_message_larger_than_the_whole_budget_is_not_kept(self):
        """A message that alone passes the budget is numbered and not kept."""
        self.rooms(limit=10)
        room = self.say("r", "small", "x" * 11)
        self.assertEqual((kept(room), room.seq, self.memory.used), ([], 2, 0))
        self.assertEqual(room.after(room.epoch, 1), ([], False))

    def test_history_size_and_the_budget_count_together(self):
        """What --history-size pushes out stops counting against the budget."""
        self.rooms(limit=100, size=2)
        room = self.say("r", "aaaa", "bbbbbb", "cc")
        self.assertEqual((kept(room), room.bytes, self.memory.used), (["bbbbbb", "cc"], 8, 8))
        self.assertEqual(self.memory.evicted, 0)

    def test_forgotten_rooms_give_their_bytes_back(self):
        """A room forgotten beyond --max-rooms no longer counts against the budget."""
        self.rooms(limit=100, max_rooms=2)
        self.say("a", "x" * 30)
        self.say("b", "y" * 20)
        self.say("c", "z" * 10)
        self.assertEqual(sorted(self.histories), ["b", "c"])
        self.assertEqual(self.memory.used, 30)
        self.say("c", "w" * 70)
        self.assertEqual((self.memory.used, self.memory.evicted), (100, 0))

    def test_evicts_from_a_largest_room_every_time(self):
        """Whatever the order of messages, rooms and sizes, each eviction
        takes the oldest message of a room that keeps the most at that
        moment, and the rooms together stay within the budget; also when
        rooms forgotten beyond --max-rooms often take the total far below
        the budget."""
        forget_oldest = RoomHistory.forget_oldest

        def watched(history):
            largest = max(self.histories.peek(room).bytes for room in self.histories)
            choices.append((history.bytes, largest))
            return forget_oldest(history)

        self.patch(RoomHistory, "forget_oldest", watched)
        for max_rooms in (12, 4):
            histories = self.rooms(limit=500, size=8, max_rooms=max_rooms)
            choices = []
            rng = random.Random(max_rooms)
            tracking = [False]
            for _ in range(3000):
                room = "r{}".format(rng.randrange(20))
                self.say(room, "x" * rng.choice([1, 5, 20, 60, 150, 300]))
                rooms = [histories.peek(name) for name in histories]
                self.assertEqual(self.memory.used, sum(h.bytes for h in rooms))
                self.assertEqual([h.bytes for h in rooms], [sum(map(len, kept(h))) for h in rooms])
                self.assertLessEqual(self.memory.used, 500)
                tracking.append(self.memory._tracking)
            self.assertGreater(len(choices), 200)
            self.assertEqual([bytes for bytes, largest in choices if bytes != largest], [])
            # The heap is rebuilt, not left to grow with every message.
            self.assertLessEqual(len(self.memory._heap), 2 * max_rooms + 64)
        # The heap was dropped as forgotten rooms took the total below a
        # quarter of the budget, and built again as it grew.
        changes = list(zip(tracking, tracking[1:]))
        self.assertGreater(min(changes.count((True, False)), changes.count((False, True))), 10)


class EpisodeTests(MemoryTestCase):
    def test_evictions_are_logged_once_per_episode(self):
        """The first eviction is logged as a warning naming the flag, the
        hundreds after it are not; once none has happened for a quiet
        minute the end of the episode is logged with what it evicted, and
        the next eviction starts a new episode."""
        self.rooms(limit=100)
        for i in range(1000):
            self.say("r{}".format(i % 10), "x" * 30)
            self.clock.advance(0.01)
        (started,) = self.history_logs()
        self.assertEqual((started["log_level"], started["limit"]), (LogLevel.warn, 100))
        self.assertIn("over --history-memory", started["log_format"])
        self.assertEqual((self.memory.used, self.memory.evicted), (90, 997))

        self.clock.advance(EPISODE_QUIET - 1)
        self.say("r0", "y" * 5)  # fits, but the episode is not a minute quiet yet
        self.assertEqual(len(self.history_logs()), 1)
        self.clock.advance(1)
        self.say("r0", "z")
        started, ended = self.history_logs()
        self.assertEqual(ended["log_level"], LogLevel.info)
        self.assertEqual((ended["count"], ended["size"]), (997, 997 * 30))

        self.say("r1", "x" * 90)
        self.assertEqual(
            [e["log_level"] for e in self.history_logs()], [LogLevel.warn, LogLevel.info, LogLevel.warn]
        )
