"""
SIGTERM and SIGINT under twistd: stop cleanly and exit 0.

Twisted's own handlers stop the reactor too, but have twistd re-raise the
signal afterwards, so the process ends "killed by SIGTERM" even after a
clean drain; init systems and scripts expect a clean stop to exit 0.  The
reactor installs its handlers as it starts running, so call
:func:`handle_stop_signals` from ``callWhenRunning``.
"""

from __future__ import annotations

import signal

from twisted.logger import Logger


def handle_stop_signals(reactor, log: Logger, doing: str) -> None:
    """
    Stop ``reactor`` on the first SIGTERM or SIGINT (which makes twistd
    stop its services) and ignore any further one: with ``--workers`` a
    terminal's Ctrl-C reaches every process and the master's SIGTERM
    follows, and stopping a reactor twice only logs an error.

    :param doing: what stopping means, for the log (``shutting down gracefully``).
    """
    stopping = []

    def stop(signum, frame):
        if stopping:
            return
        stopping.append(signum)
        log.info("received {signal}: {doing}", signal=signal.Signals(signum).name, doing=doing)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
