"""
How events travel through Redis: one entry per event, ``<seq> <epoch>
<json>`` with the bytes of a binary message or an image after the JSON, as
published and as kept in a room's history; several text messages of one
room published together travel as one batch (:func:`split_batch`).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any, Dict, List, Optional, Tuple

from broadcaster.core.events import (
    BinaryMessage,
    Event,
    ImageMessage,
    Joined,
    Left,
    Renamed,
    TextMessage,
)

_EVENT_CLASSES = {
    cls.__name__: cls for cls in (Joined, Left, Renamed, TextMessage, BinaryMessage, ImageMessage)
}
#: Each event class's fields, and those :func:`encode_event` sends (the
#: rest are the wire cache and what the publishing script sets), looked up
#: once rather than per message.
_FIELDS = {cls: tuple(field.name for field in fields(cls)) for cls in _EVENT_CLASSES.values()}
_SENT_FIELDS = {
    cls: tuple(name for name in names if name not in ("wire", "seq", "epoch", "kept"))
    for cls, names in _FIELDS.items()
}
MESSAGES = (TextMessage, BinaryMessage, ImageMessage)


def encode_event(event: Event, node: str, pid: int) -> bytes:
    """
    The JSON (and raw bytes) of ``event``, without the ``seq``/``epoch``
    prefix; a text message's ``seq`` and ``epoch`` are left out (the
    publishing script sets them in the prefix).
    """
    cls = type(event)
    body: Dict[str, Any] = {"t": cls.__name__, "o": node, "p": pid}
    blob = None
    for name in _SENT_FIELDS[cls]:
        value = getattr(event, name)
        if isinstance(value, bytes):
            body["blob"] = name
            blob = value
        else:
            body[name] = value
    head = dumps(body)
    return head if blob is None else head + b"\n" + blob


#: One encoder for every event: ``json.dumps`` with options builds a new
#: one per call.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    return _encode_json(obj).encode("utf-8")


def decode_entry(entry: bytes) -> Tuple[Dict[str, Any], Optional[bytes], int, str]:
    """
    Split a published event or history entry.

    :return: ``(body, blob, seq, epoch)``.
    :raise ValueError: if it is not one.
    """
    seq, epoch, rest = entry.split(b" ", 2)
    head, newline, blob = rest.partition(b"\n")
    body = json.loads(head)
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body, (blob if newline else None), int(seq), epoch.decode("ascii")


def split_batch(message: bytes) -> List[bytes]:
    """
    The entries of a batch: ``*`` and the length of each entry, separated
    by spaces, then a newline and the entries back to back (several text
    messages of one room, numbered and published by one script).

    :raise ValueError: if it is not one.
    """
    head, newline, rest = message.partition(b"\n")
    if not newline:
        raise ValueError("a batch without a line of lengths")
    lengths = [int(length) for length in head[1:].split(b" ")]
    entries = []
    at = 0
    for length in lengths:
        if length <= 0:
            raise ValueError("an empty entry in a batch")
        entries.append(rest[at : at + length])
        at += length
    if at != len(rest):
        raise ValueError("a batch whose lengths do not add up to its size")
    return entries


def event_from(body: Dict[str, Any], blob: Optional[bytes], seq: int, epoch: str) -> Event:
    """
    The hub event that :func:`encode_event` encoded.

    :raise ValueError: for anything else.
    """
    cls = _EVENT_CLASSES.get(body.get("t"))
    if cls is None:
        raise ValueError("unknown event type {!r}".format(body.get("t")))
    values = {name: body[name] for name in _FIELDS[cls] if name in body}
    if "blob" in body:
        values[body["blob"]] = blob or b""
    if cls is TextMessage:
        values.update(seq=seq, epoch=epoch)
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(str(e)) from None


def parse_event(entry: bytes) -> Event:
    """
    The hub event of a published message or history entry.
    """
    return event_from(*decode_entry(entry))

