"""
The twistd dropin for broadcaster: ``twistd broadcaster --help``.

It names the module that holds the options and ``makeService`` and imports
nothing else, so that scanning plugins stays cheap and cannot fail on our
dependencies.
"""

from twisted.application.service import ServiceMaker

broadcaster = ServiceMaker(
    "broadcaster",
    "broadcaster.service.tap",
    "A real-time chat and broadcast server (WebSocket, chat page, raw TCP).",
    "broadcaster",
)
