"""
What the operating system alone costs: a bare ``send()`` to many loopback
TCP sockets, with no WebSocket server at all.

A broadcast to N subscribers is at least N ``send()`` calls, one per
socket, and on loopback each runs the whole TCP stack of both ends (and
wakes the reader).  On a virtual machine that can be 8 µs or more per call,
so one message to 1000 subscribers takes 8 ms of one core however little
Python runs around it.  Latency figures such as S2's mean little without
this floor beside them, so the benchmark measures it on the same CPUs as the
servers and prints it with the results.

The probe: a child process pinned to the load generator's CPU accepts the
connections and drains them with epoll (as the load generator does); the
parent, pinned to the servers' CPU, sends one message of the benchmark's size
to every socket, round after round, and times each round.
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import time
from typing import Dict, Optional


def _drain(listener: socket.socket, count: int, cpu: Optional[int]) -> None:
    """The reader: connect ``count`` sockets and read them until they close."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    port = listener.getsockname()[1]
    listener.close()
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    poller = select.epoll()
    by_fd = {}
    for s in sockets:
        s.setblocking(False)
        poller.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
    while by_fd:
        for fd, _ in poller.poll(1.0):
            s = by_fd.get(fd)
            if s is None:
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                del by_fd[fd]
                s.close()


def send_floor(
    count: int = 1000,
    size: int = 64,
    rounds: int = 30,
    sender_cpu: Optional[int] = None,
    reader_cpu: Optional[int] = None,
) -> Dict[str, float]:
    """
    Measure the cost of one ``send()`` of ``size`` bytes to each of
    ``count`` loopback TCP sockets.

    :return: ``us_per_send`` (median over the rounds), ``round_ms`` (what
        one message to ``count`` subscribers costs at that rate) and the
        parameters.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(count)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child exits without returning)
        status = 0
        try:
            _drain(listener, count, reader_cpu)
        except BaseException:
            status = 1
        os._exit(status)
    previous = os.sched_getaffinity(0)
    accepted = []
    try:
        if sender_cpu is not None:
            os.sched_setaffinity(0, {sender_cpu})
        listener.settimeout(30)
        for _ in range(count):
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            accepted.append(conn)
        payload = b"x" * size
        per_send = []
        for _ in range(rounds):
            # Let the reader go back to sleep in epoll, as subscribers do
            # between messages.
            time.sleep(0.005)
            started = time.perf_counter()
            for conn in accepted:
                conn.send(payload)
            per_send.append((time.perf_counter() - started) / count)
    finally:
        for conn in accepted:
            conn.close()
        listener.close()
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, previous)
    us = statistics.median(per_send) * 1e6
    return {
        "connections": count,
        "size": size,
        "rounds": rounds,
        "us_per_send": round(us, 2),
        "round_ms": round(us * count / 1000, 2),
    }


def describe_floor(floor: Dict[str, float]) -> str:
    """The floor as one line for the terminal and README."""
    return (
        "system floor: a bare send() of {size} bytes to each of {connections}"
        " loopback TCP sockets costs {us_per_send:.1f} µs per socket here, so one"
        " message to {connections} subscribers takes at least {round_ms:.1f} ms"
        " of one core, whatever the server".format(**floor)
    )
