"""
Where the server's log goes, and what never reaches it.

Every log line passes through :class:`SanitisingObserver` before it is
written, whatever wrote it (our code, Autobahn's ``--debug`` chatter,
Twisted's own, a worker's forwarded events):

- **control characters are escaped** in every field: C0 and C1 controls
  (but tab), DEL, the Unicode line and paragraph separators and the bidi
  overrides become ``\\x1b``-style escapes, so that what clients send
  (a name, a URL, a line) can neither forge log lines nor send escape
  sequences to the terminal of whoever reads the log;
- **credentials are redacted** (:func:`redact`): ``Authorization``,
  ``Cookie`` and similar header values, bearer tokens, the values of
  ``token``, ``key``, ``password``, ``secret`` ... query parameters, and
  passwords in URLs.  The README's "secrets are never logged" holds for
  ``--debug`` too.

``--log-format text`` (the default) writes twistd's usual lines,
``--log-format json`` one JSON object per event and line, for log
shippers (twisted.logger's own JSON format, every event field kept, so
``client``, ``peer``, ``code`` ... can be searched on).

twistd builds its log observer after parsing the options, from its
``--logger`` option; :mod:`broadcaster.service.options` points that at
:func:`text_observer` or :func:`json_observer` and tells them where to write
with :func:`use_target`.  (With ``--syslog``, or a ``--logger`` of the
operator's own, twistd's observer is used as it is.)
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from typing import Any, Dict

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from broadcaster.core.text import CONTROLS, escape_controls

_target = "-"

_HIDDEN = "<redacted>"

_CREDENTIALS = [
    # A header, as a line ("Authorization: Bearer x") or in a dict's repr
    # ("'cookie': 'session=x'").
    (
        re.compile(
            r"(?i)\b(authorization|proxy-authorization|cookie|set-cookie|x-api-key)"
            r"""(['"]?\s*[:=]\s*['"]?)[^'"\r\n]*"""
        ),
        r"\1\2" + _HIDDEN,
    ),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + _HIDDEN),
    # Query and form parameters that carry credentials.
    (
        re.compile(
            r"(?i)([?&;]|\b)((?:access_)?token|jwt|key|api_?key|password|passwd|secret|auth"
            r"|signature|sig)=[^&\s'\"#]*"
        ),
        r"\1\2=" + _HIDDEN,
    ),
    # user:password@ in a URL.
    (re.compile(r"(//[^/@\s:'\"]*:)[^@/\s'\"]+@"), r"\1***@"),
]


# Names of headers and fields whose values are secret.
_SECRET_KEY = re.compile(
    r"(?i)^(authorization|proxy-authorization|cookie|set-cookie|x-api-key|token|access_token"
    r"|password|secret|api_key)$"
)

# Every credential pattern above contains one of these: most fields contain
# none, and are looked at once instead of four times.
_SUSPECT = re.compile(r"(?i)authoriz|cookie|api-key|bearer|basic|token|jwt|key=|pass|secret|auth=|sig|@")

# Either of the above or a control character: what a field needs looked at
# again (one search per field, as nearly every field has neither).
_ODD = re.compile("(?i:{})|{}".format(_SUSPECT.pattern[4:], CONTROLS.pattern))


def redact(text: str) -> str:
    """
    ``text`` with what looks like a credential replaced by ``<redacted>``.
    """
    if not _SUSPECT.search(text):
        return text
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text


#: Formats as redacted: a program has few, each logged again and again.
_redacted_format = lru_cache(maxsize=1024)(redact)


def _clean(value: Any) -> Any:
    if value.__class__ is str:
        # Nearly every field has neither a control character nor anything
        # like a credential: one search, no copy.
        if not _ODD.search(value):
            return value
        return escape_controls(redact(value))
    if value is None or value.__class__ in (int, float, bool):
        return value
    if isinstance(value, str):
        return escape_controls(redact(value))
    if isinstance(value, bytes):
        return _clean(value.decode("utf-8", "backslashreplace"))
    if isinstance(value, (tuple, list)):
        return type(value)(_clean(item) for item in value)
    if isinstance(value, dict):
        # Headers, as Autobahn logs them: the name says what is secret.
        return {
            key: _HIDDEN if _SECRET_KEY.search(str(key)) else _clean(item)
            for key, item in value.items()
        }
    return value


@implementer(ILogObserver)
class SanitisingObserver:
    """
    Passes on a copy of each event with its fields escaped and redacted
    (see the module docstring); the event's own ``log_*`` bookkeeping
    (logger, level, time, failure) is left alone, and its format keeps its
    line breaks (it is the server's own text).
    """

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: Dict[str, Any]) -> None:
        clean = {}
        for key, value in event.items():
            if not key.startswith("log_") or key == "log_text" or key == "log_io":
                value = _clean(value)
            elif key == "log_format" and value.__class__ is str:
                value = _redacted_format(value)
            clean[key] = value
        self._observer(clean)


def use_target(logfile: str) -> None:
    """
    Remember where log lines go: ``-`` for standard output, or a file path
    (rotated like twistd's own log file).
    """
    global _target
    _target = logfile


def _output():
    if _target == "-":
        return sys.stdout
    return LogFile.fromFullPath(_target)


def _system(event: Dict[str, Any]) -> str:
    level = event.get("log_level")
    return "{}#{}".format(event.get("log_namespace", "-"), "-" if level is None else level.name)


#: :func:`twisted.logger.formatTime` of a whole second, made once.
_second_stamp = lru_cache(maxsize=64)(formatTime)


def _stamp(when: float) -> str:
    """
    :func:`twisted.logger.formatTime` of ``when`` (to the second), made
    once per second.
    """
    return _second_stamp(int(when))


def classic_text(event: Dict[str, Any]):
    """
    The line :func:`twisted.logger.formatEventAsClassicLogText` makes of
    ``event``, made faster for the usual event (a format without calls,
    no traceback, no legacy system): its format filled by ``str.format_map``
    rather than Twisted's Python formatter, its time stamp made once per
    second.  Twisted's own formatting (4 times slower, measured) was a
    sixth of a WebSocket connection's cost in a connection storm; anything
    else, and any event the fast way cannot fill, goes to it.
    """
    text = None
    form = event.get("log_format")
    when = event.get("log_time")
    if (
        form.__class__ is str
        and when is not None
        # Twisted's formats may call a field ("{count()}"); str.format
        # cannot.
        and "()" not in form
        and "log_failure" not in event
        and "log_system" not in event
        and "log_flattened" not in event
    ):
        try:
            text = form.format_map(event)
        except Exception:
            text = None
    if text is None:
        return formatEventAsClassicLogText(event)
    if not text:
        return None
    return "{} [{}] {}\n".format(_stamp(when), _system(event), text.replace("\n", "\n\t"))


def text_observer() -> SanitisingObserver:
    """
    The observer twistd installs with ``--log-format text`` (the default).
    """
    return SanitisingObserver(FileLogObserver(_output(), classic_text))


def json_observer() -> SanitisingObserver:
    """
    The observer twistd installs with ``--log-format json``.
    """
    return SanitisingObserver(jsonFileLogObserver(_output(), recordSeparator=""))


def file_observer(observer: SanitisingObserver) -> FileLogObserver:
    """The file observer behind ``observer`` (for tests that flush it)."""
    return observer._observer
