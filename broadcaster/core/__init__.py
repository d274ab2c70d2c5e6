"""
The domain: who is connected, rooms, events and their fan-out, histories,
names and flow limits, and the backplane interface.  Nothing here imports
sockets, HTTP, Autobahn or Redis.
"""
