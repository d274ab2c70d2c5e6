"""
The Autobahn reference server of the fan-out benchmark: the least a
Twisted + Autobahn broadcast server can do.

Plain semantics, as broadcaster's plain mode: every message a client sends
(text or binary) goes to every connected client, the sender included.  Each
message is framed once (``factory.prepareMessage``) and the same frame is
sent to everyone (``sendPreparedMessage``).  No announcements, no history,
no limits, no pings: the floor broadcaster is measured against.

Usage: ``python bench/ref_autobahn.py PORT`` (listens on 127.0.0.1; SIGTERM
or SIGINT stops it).
"""

import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class BroadcastProtocol(WebSocketServerProtocol):
    def onOpen(self):
        self.factory.clients.add(self)

    def onMessage(self, payload, isBinary):
        prepared = self.factory.prepareMessage(payload, isBinary)
        for client in list(self.factory.clients):
            client.sendPreparedMessage(prepared)

    def onClose(self, wasClean, code, reason):
        self.factory.clients.discard(self)


class BroadcastFactory(WebSocketServerFactory):
    protocol = BroadcastProtocol

    def __init__(self, url):
        super().__init__(url)
        self.clients = set()


def main(argv):
    port = int(argv[1])
    factory = BroadcastFactory("ws://127.0.0.1:{}".format(port))
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)
    print("ref_autobahn listening on 127.0.0.1:{}".format(port), flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
