"""
Secrets kept off command lines: the webhook secret, the publish API keys,
the Redis password and the HS256 token secret.

Any local user can read any process's command line (``ps``,
``/proc/<pid>/cmdline``); only its own user (and root) can read its
environment (``/proc/<pid>/environ`` is mode 0400).  So each secret may be
given in a file, and ``--workers`` hands the secrets it has to its workers
in their environment, never in their arguments.

Where each comes from:

==================  ========================================================
webhook secret      ``--webhook-secret-file PATH`` or ``--webhook-secret
                    SECRET`` (not both)
token secret        ``--jwt-secret-file PATH``
API keys            ``--api-key-file PATH`` and every ``--api-key KEY``
Redis password      the URL of ``--redis`` or ``--redis-password-file
                    PATH`` (not both); else the environment variable
                    ``BROADCASTER_REDIS_PASSWORD`` (:data:`REDIS_PASSWORD`),
                    if set and not empty
==================  ========================================================

A secret file holds the secret alone (the line breaks at its end are not
part of it), UTF-8, at most :data:`MAX_SECRET_FILE` bytes; an
``--api-key-file`` holds one key per line.  A file that cannot be read, is
not UTF-8, is empty or too large is refused with the flag, the path and
the reason, never a byte of what it holds.

The flags on the command line still work, with a warning at start-up
naming the flag and its alternative (:func:`command_line_secrets`).

A ``--workers`` master gives each worker the user's options without the
secret ones (:func:`worker_args`: ``--redis`` becomes the URL without its
password) and the secrets in these environment variables of the worker
(:func:`worker_environment`), which only a worker (``--worker-fds``)
reads:

=======================================  ===================================
``BROADCASTER_WORKER_WEBHOOK_SECRET``    the webhook secret
``BROADCASTER_WORKER_API_KEYS``          the API keys, as a JSON list
``BROADCASTER_WORKER_JWT_SECRET``        the HS256 token secret
``BROADCASTER_REDIS_PASSWORD``           the Redis password
=======================================  ===================================

The ``WORKER`` ones are internal: a single server ignores them, so a stray
one cannot turn the API or token sign-in on.  A variable with nothing to
say is removed from the worker's environment, and all of them from the
private ``redis-server``'s.  (A worker reads ``--jwt-public-key`` itself,
as it reads an ``ssl:`` port's certificate: a public key is no secret.)
"""

from __future__ import annotations

import json
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from twisted.python.usage import UsageError

from broadcaster.http.api import read_key_file

#: The user's way to give the Redis password without a file; lowest in
#: precedence.  The master also hands the password to its workers in it.
REDIS_PASSWORD = "BROADCASTER_REDIS_PASSWORD"

#: Internal to ``--workers``: the webhook secret, for a worker.
WORKER_WEBHOOK_SECRET = "BROADCASTER_WORKER_WEBHOOK_SECRET"

#: Internal to ``--workers``: the API keys, a JSON list of strings, for a worker.
WORKER_API_KEYS = "BROADCASTER_WORKER_API_KEYS"

#: Internal to ``--workers``: the ``--jwt-secret-file`` secret, for a worker.
WORKER_JWT_SECRET = "BROADCASTER_WORKER_JWT_SECRET"

#: Every variable that may hold a secret.
SECRET_VARIABLES = (WORKER_WEBHOOK_SECRET, WORKER_API_KEYS, WORKER_JWT_SECRET, REDIS_PASSWORD)

#: The options a worker is not given: it gets what they say in its environment.
SECRET_OPTIONS = (
    "webhook-secret",
    "webhook-secret-file",
    "api-key",
    "api-key-file",
    "redis-password-file",
    "jwt-secret-file",
)

#: The largest secret file read, in bytes: a path to something else (a log,
#: /dev/zero) is refused rather than read whole into memory.
MAX_SECRET_FILE = 64 * 1024


def _unreadable(flag: str, path: str, error: Exception) -> UsageError:
    """
    The usage error for a file that could not be read: the flag, the path
    and the reason, nothing of what the file holds (a
    ``UnicodeDecodeError`` quotes a byte of it).
    """
    if isinstance(error, UnicodeDecodeError):
        reason = "it is not UTF-8 text"
    else:
        reason = getattr(error, "strerror", None) or type(error).__name__
    return UsageError("--{} {!r} cannot be read: {}".format(flag, path, reason))


def read_secret_file(flag: str, path: str) -> str:
    """
    The secret in the file ``path``, given to ``--<flag>``: its text
    without the line breaks at its end.

    :raise UsageError: naming the flag and the path, if the file cannot be
        read, is not UTF-8, is larger than :data:`MAX_SECRET_FILE` bytes
        or holds nothing.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
        if len(data) > MAX_SECRET_FILE:
            raise UsageError(
                "--{} {!r} is larger than {} bytes: is it the right file?".format(
                    flag, path, MAX_SECRET_FILE
                )
            )
        secret = data.decode("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(flag, path, e) from None
    if not secret:
        raise UsageError("--{} {!r} is empty".format(flag, path))
    return secret


def read_keys(flag: str, path: str) -> List[str]:
    """
    The keys in the ``--api-key-file`` ``path`` (see
    :func:`~broadcaster.http.api.read_key_file`).

    :raise UsageError: naming the flag and the path, if the file cannot be
        read or holds no key.
    """
    try:
        keys = read_key_file(path)
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(flag, path, e) from None
    if not keys:
        raise UsageError("--{} {!r} holds no keys".format(flag, path))
    return keys


def worker_api_keys(environ: Mapping[str, str]) -> List[str]:
    """
    The API keys a worker's master handed it, if any.

    :raise UsageError: if the variable is not a JSON list of strings.
    """
    text = environ.get(WORKER_API_KEYS)
    if not text:
        return []
    try:
        keys = json.loads(text)
    except ValueError:
        keys = None
    if not isinstance(keys, list) or not all(isinstance(key, str) and key for key in keys):
        raise UsageError("{} must be a JSON list of keys".format(WORKER_API_KEYS))
    return keys


def redis_password(
    url_password: Optional[str],
    file_password: Optional[str],
    environ: Mapping[str, str],
) -> Optional[str]:
    """
    The Redis password: the URL's, else the file's, else the environment
    variable's (if not empty).

    :raise UsageError: if both the URL and ``--redis-password-file`` give
        one: which one was meant cannot be told.
    """
    if url_password is not None and file_password is not None:
        raise UsageError(
            "--redis holds a password and --redis-password-file gives another: give only one"
            " (better the file: command lines are visible to every local user)"
        )
    if url_password is not None:
        return url_password
    if file_password is not None:
        return file_password
    return environ.get(REDIS_PASSWORD) or None


#: For each option that takes a secret on the command line, what to use instead.
_ALTERNATIVES = {
    "webhook-secret": "--webhook-secret-file",
    "api-key": "--api-key-file",
    "redis": "--redis-password-file or the {} environment variable".format(REDIS_PASSWORD),
}


def command_line_secrets(
    given: Iterable[Tuple[str, str]], redis_url_password: bool
) -> List[Tuple[str, str]]:
    """
    ``(flag, alternative)`` for each option of ``given`` that put a secret
    on the command line, each named once: the warnings to log at start-up.

    :param given: ``(option, value)`` as given, in order.
    :param redis_url_password: whether the ``--redis`` URL holds a password.
    """
    named = {option for option, _ in given}
    if not redis_url_password:
        named.discard("redis")
    return [
        ("--" + option, alternative)
        for option, alternative in _ALTERNATIVES.items()
        if option in named
    ]


def worker_args(
    given: Iterable[Tuple[str, str]],
    takes_value: Iterable[str],
    redis_urls: Sequence[str],
) -> List[str]:
    """
    The user's options for a worker's command line: in the order given,
    without the secret ones, and with each ``--redis`` as the next of
    ``redis_urls``, which must hold no password.

    :param given: ``(option, value)`` as given, long names only.
    :param takes_value: the options that take a value (the others are flags).
    """
    takes_value = set(takes_value)
    redis = iter(redis_urls)
    args: List[str] = []
    for option, value in given:
        if option in SECRET_OPTIONS:
            continue
        if option == "redis":
            value = next(redis)
        args.append("--" + option)
        if option in takes_value:
            args.append(value)
    return args


def worker_environment(
    webhook_secret: Optional[str],
    api_keys: Sequence[str],
    redis_password: Optional[str],
    jwt_secret: Optional[str] = None,
) -> Dict[str, Optional[str]]:
    """
    The secrets for a worker's environment: each variable of
    :data:`SECRET_VARIABLES` with its value, or ``None`` where it is to
    be removed.
    """
    return {
        WORKER_WEBHOOK_SECRET: webhook_secret,
        WORKER_API_KEYS: json.dumps(list(api_keys)) if api_keys else None,
        WORKER_JWT_SECRET: jwt_secret,
        REDIS_PASSWORD: redis_password,
    }
