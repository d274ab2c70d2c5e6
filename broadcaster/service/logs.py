"""
``--log-format json``: one JSON object per log event and line, for log
shippers, using twisted.logger's own JSON format (every event field kept, so
``client``, ``peer``, ``code`` ... can be searched on).

twistd builds its log observer after parsing the options, from its
``--logger`` option; :mod:`broadcaster.service.tap` points that at
:func:`json_observer` and tells it where to write with :func:`use_json`.
"""

from __future__ import annotations

import sys

from twisted.logger import FileLogObserver, jsonFileLogObserver
from twisted.python.logfile import LogFile

_target = "-"


def use_json(logfile: str) -> None:
    """
    Remember where JSON log lines go: ``-`` for standard output, or a file
    path (rotated like twistd's own log file).
    """
    global _target
    _target = logfile


def json_observer() -> FileLogObserver:
    """
    The observer twistd installs with ``--log-format json``.
    """
    if _target == "-":
        output = sys.stdout
    else:
        output = LogFile.fromFullPath(_target)
    return jsonFileLogObserver(output, recordSeparator="")
