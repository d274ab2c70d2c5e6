"""
What every kind of connection logs when it joins and leaves the hub.

WebSocket, image-port and line-bridge clients are all members of the same
chat; an operator reading the log should see them announced the same way.
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger


def log_connect(log: Logger, client: str, peer: str, kind: str, count: int) -> None:
    """
    Log a member joining.

    :param kind: what sort of client it is (``plain``, ``json``, ``image``, ``line``).
    :param count: members connected now, this one included.
    """
    log.info(
        "[CONNECT] {client} connected from {peer} ({kind}); {count} connected",
        client=client,
        peer=peer,
        kind=kind,
        count=count,
    )


def log_disconnect(
    log: Logger,
    client: str,
    duration: float,
    count: int,
    code: Optional[int] = None,
    reason: str = "",
    clean: bool = True,
) -> None:
    """
    Log a member leaving.

    :param duration: seconds the member was connected.
    :param code: the WebSocket close code, if the connection had one.
    :param reason: why it left, as the peer or the server said.
    """
    log.info(
        "[DISCONNECT] {client} disconnected: code={code} reason={reason!r}"
        " clean={clean} after {duration:.1f}s; {count} connected",
        client=client,
        code=code,
        reason=reason,
        clean=clean,
        duration=duration,
        count=count,
    )
