"""
Coercion functions for ``usage.Options`` parameters, shared by the server's
and the client's options.  Each has a ``coerceDoc`` that ``--help`` shows.
"""


def _whole(value: str, wanted: str) -> int:
    """
    ``value`` as an int.

    :raise ValueError: saying what was ``wanted`` rather than quoting int().
    """
    try:
        return int(value)
    except ValueError:
        raise ValueError(wanted) from None


def positive_int(value: str) -> int:
    """
    :raise ValueError: unless ``value`` is a whole number above zero.
    """
    number = _whole(value, "must be a positive integer")
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


positive_int.coerceDoc = "A positive integer."  # type: ignore[attr-defined]


def byte_count(value: str) -> int:
    """
    A size in bytes, for the byte budgets: a whole number above zero.

    :raise ValueError: otherwise (``256MiB`` too: say 268435456).
    """
    number = _whole(value, "must be a whole number of bytes above zero")
    if number <= 0:
        raise ValueError("must be a whole number of bytes above zero")
    return number


byte_count.coerceDoc = "A number of bytes, above zero."  # type: ignore[attr-defined]


def positive_float(value: str) -> float:
    """
    :raise ValueError: unless ``value`` is a number above zero.
    """
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


positive_float.coerceDoc = "A positive number of seconds."  # type: ignore[attr-defined]


def non_negative_int(value: str) -> int:
    """
    :raise ValueError: unless ``value`` is a whole number, zero or more.
    """
    number = _whole(value, "must be zero or a positive integer")
    if number < 0:
        raise ValueError("must be zero or a positive integer")
    return number


non_negative_int.coerceDoc = "A whole number, 0 or more."  # type: ignore[attr-defined]


def non_negative_float(value: str) -> float:
    """
    :raise ValueError: unless ``value`` is a number, zero or more.
    """
    number = float(value)
    if not number >= 0:
        raise ValueError("must be zero or a positive number")
    return number


non_negative_float.coerceDoc = "A number, 0 or more."  # type: ignore[attr-defined]
