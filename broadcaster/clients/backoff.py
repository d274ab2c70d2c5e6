"""
How long a client waits before reconnecting: exponential backoff with full
jitter.

Attempt ``n`` (from 0) waits a time drawn uniformly from ``[0, min(maximum,
initial * 2 ** n)]``.  The bound doubles so that a server that is down is
not hammered, and the whole range is drawn from ("full jitter") so that
thousands of clients cut off by one restart do not come back in step: the
restarted server sees them spread over the window instead of all at once.
A connection that lasted (``reset``) starts again from the shortest wait.

Shared by ``broadcaster-client --reconnect`` and :class:`broadcaster.Client`;
nothing here does I/O.
"""

from __future__ import annotations

import random as _random
from typing import Callable

#: Seconds the first reconnect may wait at most.
INITIAL = 0.5
#: Seconds no reconnect waits more than.
MAXIMUM = 30.0


class Backoff:
    """
    The waits before successive reconnects (see the module docstring).

    :param initial: the bound of the first wait, in seconds.
    :param maximum: the bound no wait exceeds.
    :param random: a function returning a float in ``[0, 1)``; tests give
        a fixed one.
    """

    def __init__(
        self,
        initial: float = INITIAL,
        maximum: float = MAXIMUM,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum, not {} and {}".format(initial, maximum))
        self.initial = initial
        self.maximum = maximum
        self._random = random
        #: Reconnects attempted since the last :meth:`reset`.
        self.attempts = 0

    def bound(self) -> float:
        """
        The longest the next wait may be.
        """
        # min() before the power would overflow after ~1000 attempts.
        exponent = min(self.attempts, 64)
        return min(self.maximum, self.initial * 2.0 ** exponent)

    def next(self) -> float:
        """
        The wait before the next reconnect, in seconds; counts the attempt.
        """
        delay = self._random() * self.bound()
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """
        A connection succeeded: the next wait is short again.
        """
        self.attempts = 0
