"""
Clients: the command-line client, the blocking client library for the
JSON protocol (:mod:`broadcaster.clients.library`, with what it shares with
the command line's reconnecting: backoff and recovery), a small socket
library for the raw-TCP ports, and the image tools.
"""
