"""
The HTTP side: the site on the main port (chat page, /healthz, the
WebSocket endpoint), the publish API, sign-in through --auth-url or signed
tokens (``--jwt-*``), webhooks, image fetching and metrics.
"""
