"""
How each kind of client talks to the hub: the connection core every kind
shares (admission, the one budgeted outbound path, rate limits), the
WebSocket protocol, the line bridge, the image port and the wire codecs.
"""
