"""
Text from strangers, made safe to show to a human: on a terminal (the line
bridge's ``nc`` users, ``broadcaster-client``) or in a log.

A terminal obeys the control characters it is sent: ESC starts sequences
that retitle the window (``\\x1b]0;...\\x07``), move the cursor, rewrite
what is on screen, or on some terminals answer back; a bare CR or a line
separator makes one line look like two.  Bidi overrides reorder what is
shown.  So text that someone else wrote is shown with those characters
written out as escapes (``\\x1b``, ``\\u202e``): nothing is lost, nothing is
obeyed.  Tab is left alone.
"""

from __future__ import annotations

import re

#: C0 controls but tab, DEL, C1 controls, the line and paragraph
#: separators, bidi embeddings, overrides and isolates.
CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# What json.dumps(ensure_ascii=False) leaves raw of the above (it escapes
# the C0 controls itself).
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return "\\x{:02x}".format(code) if code < 0x100 else "\\u{:04x}".format(code)


def escape_controls(text: str) -> str:
    """
    ``text`` with its control characters (but tab) written as escapes.
    """
    return CONTROLS.sub(_escape, text)


def json_safe(line: str) -> str:
    """
    A JSON document (from ``json.dumps(..., ensure_ascii=False)``) with the
    control characters JSON leaves raw written as ``\\u`` escapes: the same
    document, safe on a terminal.  (They can only be inside strings.)
    """
    return _RAW_IN_JSON.sub(lambda m: "\\u{:04x}".format(ord(m.group())), line)
