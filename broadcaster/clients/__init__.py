"""
Clients: the command-line client, a small socket library for the raw-TCP
ports, and the image tools.
"""
