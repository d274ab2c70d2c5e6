"""
Writing a broadcast to a client's socket at once.

Twisted's ``transport.write`` only queues: it registers the socket for
writability with the reactor (a system call), and the reactor sends the
data on its next iteration (another one), then unregisters it (a third).
A broadcast to a thousand clients thus costs three thousand system calls.
When nothing is queued for a plain TCP connection, :func:`send_now` sends
right away, one system call, and queues through the transport only what the
socket did not take, so Twisted's buffering, flow control and error
handling still apply whenever the socket is not ready.
"""

from __future__ import annotations

from twisted.internet.tcp import Connection


def send_now(transport, data: bytes) -> None:
    """
    Send ``data`` on ``transport``, directly when its send buffer is empty.

    Anything else (TLS, a non-TCP transport, a backlog, a closing connection,
    a socket that would block or has failed) takes ``transport.write``, which
    keeps the order of what is already queued and reports errors as usual.
    """
    if (
        isinstance(transport, Connection)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "TLS", False)
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and len(transport.dataBuffer) == transport.offset
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Would block, or failed: the transport's own write path deals
            # with both (it will see the error when it tries).
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
