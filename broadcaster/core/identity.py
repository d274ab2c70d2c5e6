"""
Who a client is, as a sign-in service says, and how asking can fail: the
contract between the WebSocket handshake and whatever signs clients in
(:mod:`broadcaster.http.auth` asks an HTTP service, ``--auth-url``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Identity:
    """
    Who the auth service says a client is; either may be ``None``.
    """

    user: Optional[str] = None
    name: Optional[str] = None


class AuthDenied(Exception):
    """
    The auth service refused the client (401 or 403).

    :ivar status: the status it answered.
    """

    def __init__(self, status: int) -> None:
        super().__init__("the auth service refused the client (HTTP {})".format(status))
        self.status = status


class AuthUnavailable(Exception):
    """
    No usable answer from the auth service; ``str()`` says why (no
    credentials in it).
    """
