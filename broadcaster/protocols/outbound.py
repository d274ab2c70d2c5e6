"""
The one way bytes leave a connection for its client, and the budget that
bounds them (``--max-buffer``): :class:`Outbound`.

Every kind of client (WebSocket, line bridge, image port) writes through
one; a limit kept here holds whatever produced the bytes.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Optional

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

#: The largest piece of one queued payload handed to a transport at once.
#: A transport copies what it is given into a buffer of its own; handing it
#: a payload shared by many clients (an image, a batch) in pieces keeps that
#: copy to one piece per client, however large the payload.
PIECE = 64 * 1024


@implementer(IPushProducer)
class Outbound:
    """
    The one way bytes leave a connection for its client, and the budget
    that bounds them (``--max-buffer``).

    Every write for a client comes here: fan-out batches, replies, errors,
    images, pings and close frames alike.  While the transport takes bytes
    (its own buffer holds less than its ``bufferSize``, 64 KiB), they go
    straight to it; once it asks its producer (this object) to pause, they
    wait here, as references to the caller's bytes: a payload sent to a
    thousand clients is held once, not a thousand times.  When the
    transport has drained it asks to resume, and the queue is handed over
    in pieces of at most :data:`PIECE` bytes until it pauses again.

    So what the server holds for one client is what waits here
    (:attr:`queued`, exact) plus at most ``bufferSize`` + :data:`PIECE`
    bytes in the transport.  A write that would take :attr:`queued` past
    the budget is refused (:meth:`write` returns ``False``) and the caller
    closes the client as a slow consumer, whatever produced the bytes; a
    write into an empty queue always fits, so one message of any allowed
    size reaches a client that was keeping up.

    :ivar paused: whether the transport has asked us to stop writing.
    :ivar queued: bytes waiting here for the transport.
    """

    # One per connection: slots keep tens of thousands of them small, and
    # the queue itself exists only while something waits.
    __slots__ = ("_transport", "paused", "queued", "_queue", "_offset", "_drained", "spent")

    def __init__(self, transport) -> None:
        self._transport = transport
        self.paused = False
        self.queued = 0
        self._queue: Optional[Deque] = None
        # Bytes of the queue's head already handed to the transport.
        self._offset = 0
        # Called once the queue is empty (see when_drained).
        self._drained: Optional[Callable[[], None]] = None
        #: Set once the client was cut: what is still written (a close
        #: frame, a last error) is not budgeted.
        self.spent = False
        # twisted.web's HTTP channel registered itself on the transport
        # before Autobahn took the connection over; it is not the producer
        # any more.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(self, True)

    def write(self, data, limit: int) -> bool:
        """
        Send ``data`` (bytes, or a memoryview of shared bytes) to the client
        after everything written before it.

        :param limit: the budget: bytes that may wait here for the client.
        :return: ``False`` if the client is too far behind to take it
            (nothing was queued): the caller closes it.
        """
        # Something waits only while the transport is full (or being
        # refilled); into an empty queue any one write fits.
        if self.queued and not self.spent and self.queued + len(data) > limit:
            return False
        self._put(data)
        return True

    def write_sequence(self, chunks, limit: int) -> bool:
        """
        :meth:`write` ``chunks`` one after the other, budgeted as one
        message (a header and the payload it announces): all of them are
        queued, or none.
        """
        if self.queued and not self.spent and self.queued + sum(map(len, chunks)) > limit:
            return False
        for chunk in chunks:
            self._put(chunk)
        return True

    def _put(self, data) -> None:
        queue = self._queue
        if not self.paused and not queue and len(data) <= PIECE and data.__class__ is bytes:
            self._transport.write(data)
            return
        if queue is None:
            queue = self._queue = deque()
        queue.append(data)
        self.queued += len(data)
        if not self.paused:
            self._pump()

    def cut(self) -> int:
        """
        The client is being closed as a slow consumer: forget what waits
        for it (but the rest of a message it has begun to receive, so that
        a close frame after it is still a frame of its own).

        :return: the bytes that were waiting.
        """
        waiting = self.queued
        self.spent = True
        queue = self._queue
        if queue:
            if self._offset:
                head = queue[0]
                queue.clear()
                queue.append(head)
                self.queued = len(head) - self._offset
            else:
                queue.clear()
                self.queued = 0
        return waiting

    def when_drained(self, then: Callable[[], None]) -> None:
        """
        Call ``then`` once everything written so far is in the transport's
        hands (now, if nothing waits).
        """
        if self._queue:
            self._drained = then
        else:
            then()

    def lose_connection(self) -> None:
        """
        Close the connection once everything written has been sent.

        A transport closes only once its buffer is empty *and* no producer
        of its is paused, so this producer steps aside first.
        """

        def close() -> None:
            self.step_aside()
            self._transport.loseConnection()

        self.when_drained(close)

    def step_aside(self) -> None:
        """
        Stop being the transport's producer (before closing it).
        """
        if getattr(self._transport, "producer", None) is self:
            self._transport.unregisterProducer()

    def _pump(self) -> None:
        queue = self._queue
        transport = self._transport
        while queue and not self.paused:
            head = queue[0]
            start = self._offset
            if not start and len(head) <= PIECE:
                queue.popleft()
                piece = head if head.__class__ is bytes else bytes(head)
            else:
                end = start + PIECE
                # One piece copied out of the shared payload.
                piece = bytes(memoryview(head)[start:end])
                if end >= len(head):
                    queue.popleft()
                    self._offset = 0
                else:
                    self._offset = end
            self.queued -= len(piece)
            transport.write(piece)
        if not queue:
            self._queue = None
            drained, self._drained = self._drained, None
            if drained is not None:
                drained()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._queue:
            self._pump()

    def stopProducing(self) -> None:
        # The connection is gone: nothing waiting will ever be sent.
        self.paused = False
        self._queue = None
        self._drained = None
        self.queued = 0
