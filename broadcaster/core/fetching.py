"""
Images fetched by URL (``image_url`` requests), as the protocols see them:
the limit per client, the error a client is told, and how a URL is named
in logs.  :mod:`broadcaster.http.fetch` does the fetching, behind its SSRF
guard.
"""

from __future__ import annotations

from urllib.parse import urlsplit

#: Downloads one client may have under way at once.
MAX_FETCHES_PER_CLIENT = 2


class FetchError(Exception):
    """
    An image URL could not be fetched; ``str()`` is a reason fit to send to
    the client that asked.
    """


def describe_url(url: str) -> str:
    """
    ``scheme://host:port``, fit for logs: no credentials, path or query
    (webhook URLs often carry a secret in the path, image URLs the client's
    tokens in the query).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        if ":" in host:
            host = "[{}]".format(host)
        port = ":{}".format(parts.port) if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    return "{}://{}{}".format(parts.scheme, host, port)
