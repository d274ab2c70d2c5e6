"""
The Lua scripts of the Redis backplane, kept as ``.lua`` files beside this
module (package data) and read once at import.  Each runs atomically, so
every node sees their effects and their publications in one order.

The scripts that read or advance a room's sequence start with
``current_epoch.lua``: a room whose epoch is gone (Redis lost its data)
starts a new run of its sequence, with an empty history.
"""

from __future__ import annotations

from importlib import resources

from broadcaster.redis.commands import Script


def _read(name: str) -> str:
    return resources.files("broadcaster.redis").joinpath("scripts", name).read_text("utf-8")


_CURRENT_EPOCH = _read("current_epoch.lua")

PUBLISH_TEXT = Script(_CURRENT_EPOCH + _read("publish_text.lua"))
POSITION = Script(_CURRENT_EPOCH + _read("position.lua"))
MISSED = Script(_CURRENT_EPOCH + _read("missed.lua"))
PRESENCE = Script(_read("presence.lua"))
REGISTER = Script(_read("register.lua"))
HEARTBEAT = Script(_read("heartbeat.lua"))
DEREGISTER = Script(_read("deregister.lua"))
NODES = Script(_read("nodes.lua"))
