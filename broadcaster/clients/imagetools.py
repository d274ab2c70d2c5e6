"""
Command-line tools for the image port, built on :mod:`broadcaster.clients.sockets`.

``broadcaster-send-image FILE... --to HOST:PORT [--wait SECONDS]``
    Sends each file as one frame, printing ``sent FILE (N bytes)`` for each,
    then listens for ``--wait`` seconds (default 1) for the server's
    refusals: the server answers only frames it refuses, so silence is
    success.  Each refusal is printed on stderr as ``broadcaster-send-image:
    server refused an image: <reason>``.  Every file is checked for being
    readable and non-empty before connecting.

    Exit status: 0 every image sent and none refused; 1 cannot connect, the
    server refused an image, or the connection was lost; 2 usage error
    (including a file that cannot be read).

``broadcaster-watch-images --from HOST:PORT --dir DIR [--count N] [--timeout SECONDS]``
    Saves every image other clients send as
    ``DIR/image-<UTC time YYYYmmddTHHMMSS>-<n>.png`` (``n`` counts from 1,
    and skips names that are already taken), printing each path on stdout as
    soon as it is written.  ``DIR`` is created if missing.  A frame that is
    not an image is reported on stderr and skipped.

    Exit status: 0 after ``--count`` images, or on Ctrl-C; 1 cannot
    connect, no image for ``--timeout`` seconds, or the server closed the
    connection; 2 usage error (including a ``--dir`` that cannot be created).

``HOST:PORT`` takes IPv6 addresses in brackets: ``[::1]:9998``.

Both run as console scripts or as ``python -m broadcaster.clients.imagetools send
...`` / ``python -m broadcaster.clients.imagetools watch ...``.  Pillow is needed only
to watch.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

from broadcaster.clients import sockets

SEND = "broadcaster-send-image"
WATCH = "broadcaster-watch-images"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: Seconds allowed for connecting.
CONNECT_TIMEOUT = 10.0

#: Largest frame the watcher accepts.  The server re-encodes what it is sent
#: as PNG, which can be far bigger than the JPEG that came in: 256 MiB covers
#: the PNG of the largest image the server accepts by default (50 million
#: RGB pixels).
WATCH_MAX_FRAME = 256 * 1024 * 1024

#: Longer frames cannot be error frames (they are other clients' images),
#: so the sender skips them without keeping them in memory.
_MAX_ERROR_FRAME = 64 * 1024
_SKIP_CHUNK = 64 * 1024


def parse_address(text: str) -> Tuple[str, int]:
    """
    Parse ``HOST:PORT``, with an IPv6 host in brackets (``[::1]:9998``).

    :raise argparse.ArgumentTypeError: with a message saying what is wrong.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise argparse.ArgumentTypeError(
                "{!r} is not [IPV6-ADDRESS]:PORT, e.g. [::1]:9998".format(text)
            )
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise argparse.ArgumentTypeError(
                "{!r} is not HOST:PORT, e.g. localhost:9998".format(text)
            )
        if ":" in host:
            raise argparse.ArgumentTypeError(
                "{!r}: put an IPv6 address in brackets, e.g. [::1]:9998".format(text)
            )
    if not host:
        raise argparse.ArgumentTypeError("{!r} has no host, e.g. localhost:9998".format(text))
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(
            "{!r}: the port must be a number from 1 to 65535".format(text)
        )
    return host, int(port_text)


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError("{!r} is not a positive whole number".format(text))
    return number


def _seconds(text: str, allow_zero: bool = False) -> float:
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not (number >= 0 if allow_zero else number > 0) or number == float("inf"):
        raise argparse.ArgumentTypeError(
            "{!r} is not a {} number of seconds".format(
                text, "non-negative" if allow_zero else "positive"
            )
        )
    return number


def _say(program: str, message: str) -> None:
    print("{}: {}".format(program, message), file=sys.stderr, flush=True)


def _address_text(address: Tuple[str, int]) -> str:
    host, port = address
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


# broadcaster-send-image


def _send_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=SEND,
        description="Send image files to a broadcaster image port, one frame each, "
        "and report any the server refuses.",
        epilog="Exit status: 0 all sent and none refused; 1 cannot connect, an "
        "image refused or the connection lost; 2 usage error or unreadable file.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="an image file to send")
    parser.add_argument(
        "--to", required=True, type=parse_address, metavar="HOST:PORT",
        help="the server's image port, e.g. localhost:9998 or [::1]:9998",
    )
    parser.add_argument(
        "--wait", type=lambda text: _seconds(text, allow_zero=True), default=1.0,
        metavar="SECONDS",
        help="how long to listen for refusals after sending (default: 1.0); the "
        "server says nothing about the images it accepts",
    )
    return parser


def _unreadable(path: str) -> Optional[str]:
    """
    :return: why ``path`` cannot be sent, or ``None`` if it can.
    """
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                return "cannot send {!r}: the file is empty".format(path)
    except OSError as e:
        return "cannot read {!r}: {}".format(path, e.strerror or e)
    return None


def _skip(sock, length: int, deadline: float) -> None:
    while length:
        remaining = deadline - time.monotonic()
        chunk = min(length, _SKIP_CHUNK)
        sockets.read_exactly(sock, chunk, timeout=max(remaining, 0))
        length -= chunk


def _refusals(sock, wait: float) -> Tuple[List[str], Optional[str]]:
    """
    Listen for ``wait`` seconds for error frames, skipping other clients'
    images.

    :return: the reasons the server gave, and why listening ended early
        (``None`` if it did not).
    """
    reasons: List[str] = []
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return reasons, None
        try:
            try:
                payload = sockets.read_frame(sock, remaining, max_size=_MAX_ERROR_FRAME)
            except sockets.FrameTooLarge as e:
                _skip(sock, e.length, deadline)
                continue
        except sockets.FrameTimeout:
            # Time is up, perhaps in the middle of another client's image.
            return reasons, None
        except sockets.ConnectionClosed as e:
            return reasons, "the server closed the connection{}".format(
                " ({})".format(e) if e.midway else ""
            )
        except sockets.SocketError as e:
            return reasons, str(e)
        if payload.startswith(sockets.ERROR_PREFIX):
            reasons.append(payload[len(sockets.ERROR_PREFIX) :].decode("utf-8", "replace"))


def main_send(argv: Optional[Sequence[str]] = None) -> int:
    """
    ``broadcaster-send-image``: see the module docstring.

    :param argv: the arguments, without the program name; ``None`` for
        ``sys.argv[1:]``.
    :return: the exit status.
    """
    args = _send_parser().parse_args(argv)
    for path in args.files:
        problem = _unreadable(path)
        if problem is not None:
            _say(SEND, problem)
            return EXIT_USAGE
    host, port = args.to
    try:
        sock = sockets.connect(host, port, timeout=CONNECT_TIMEOUT)
    except sockets.SocketError as e:
        _say(SEND, str(e))
        return EXIT_FAILURE
    failed = False
    try:
        for path in args.files:
            try:
                size = sockets.send_image(sock, path)
            except (OSError, ValueError) as e:
                # The file changed since it was checked.
                _say(SEND, "cannot send {!r}: {}".format(path, getattr(e, "strerror", None) or e))
                failed = True
                continue
            except sockets.SocketError as e:
                _say(SEND, "could not send {!r}: {}".format(path, e))
                failed = True
                # The server hangs up after a refusal it cannot recover
                # from; its error frame may still be waiting to be read.
                break
            print("sent {} ({} bytes)".format(path, size), flush=True)
        reasons, ended = _refusals(sock, args.wait)
        for reason in reasons:
            _say(SEND, "server refused an image: {}".format(reason))
        if ended is not None and not failed:
            _say(SEND, "stopped listening for refusals: {}".format(ended))
        return EXIT_FAILURE if failed or reasons or ended is not None else EXIT_OK
    except KeyboardInterrupt:
        return EXIT_FAILURE
    finally:
        sockets.close(sock)


# broadcaster-watch-images


def _watch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=WATCH,
        description="Save every image sent to a broadcaster image port as a PNG file.",
        epilog="Exit status: 0 after --count images or on Ctrl-C; 1 cannot connect, "
        "--timeout passed or the server closed the connection; 2 usage error.",
    )
    parser.add_argument(
        "--from", dest="source", required=True, type=parse_address, metavar="HOST:PORT",
        help="the server's image port, e.g. localhost:9998 or [::1]:9998",
    )
    parser.add_argument(
        "--dir", required=True, metavar="DIR",
        help="where to save images (created if missing)",
    )
    parser.add_argument(
        "--count", type=_positive_int, metavar="N", help="exit after saving N images"
    )
    parser.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS",
        help="exit with status 1 if no image arrives for this long",
    )
    return parser


def _save(image, directory: str, number: int) -> Tuple[str, int]:
    """
    Save ``image`` as a PNG under a name no other file has.

    :return: the path written and the number used in its name.
    """
    out = io.BytesIO()
    image.save(out, format="PNG")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    while True:
        path = os.path.join(directory, "image-{}-{}.png".format(stamp, number))
        try:
            # "x": never overwrite, e.g. another watcher's file from the same second.
            f = open(path, "xb")
        except FileExistsError:
            number += 1
            continue
        try:
            with f:
                f.write(out.getvalue())
        except BaseException:
            os.unlink(path)
            raise
        return path, number


def main_watch(argv: Optional[Sequence[str]] = None) -> int:
    """
    ``broadcaster-watch-images``: see the module docstring.

    :param argv: the arguments, without the program name; ``None`` for
        ``sys.argv[1:]``.
    :return: the exit status.
    """
    args = _watch_parser().parse_args(argv)
    try:
        os.makedirs(args.dir, exist_ok=True)
    except OSError as e:
        _say(WATCH, "cannot create --dir {!r}: {}".format(args.dir, e.strerror or e))
        return EXIT_USAGE
    try:
        return _watch(args)
    except KeyboardInterrupt:
        return EXIT_OK


def _watch(args: argparse.Namespace) -> int:
    host, port = args.source
    try:
        sock = sockets.connect(host, port, timeout=CONNECT_TIMEOUT)
    except sockets.SocketError as e:
        _say(WATCH, str(e))
        return EXIT_FAILURE
    try:
        saved = 0
        number = 1
        last = time.monotonic()
        while args.count is None or saved < args.count:
            remaining = None
            if args.timeout is not None:
                remaining = max(last + args.timeout - time.monotonic(), 0)
            try:
                payload = sockets.read_frame(sock, timeout=remaining, max_size=WATCH_MAX_FRAME)
            except sockets.FrameTimeout as e:
                cut = " ({})".format(e) if e.midway else ""
                _say(WATCH, "no image arrived within {:g} s{}".format(args.timeout, cut))
                return EXIT_FAILURE
            except sockets.ConnectionClosed as e:
                cut = " ({})".format(e) if e.midway else ""
                _say(WATCH, "the server closed the connection{}; {} image{} saved".format(
                    cut, saved, "" if saved == 1 else "s"))
                return EXIT_FAILURE
            except sockets.SocketError as e:
                _say(WATCH, str(e))
                return EXIT_FAILURE
            try:
                image = sockets.decode_image(payload)
            except sockets.ServerError as e:
                # We send nothing, so there is nothing for the server to refuse.
                _say(WATCH, "unexpected error from the server: {}".format(e.reason))
                continue
            if image is None:
                _say(WATCH, "skipped a frame of {} bytes that is not an image".format(
                    len(payload)))
                continue
            path, number = _save(image, args.dir, number)
            number += 1
            saved += 1
            last = time.monotonic()
            print(path, flush=True)
    finally:
        sockets.close(sock)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    ``python -m broadcaster.clients.imagetools send|watch ...``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    tools = {"send": main_send, "watch": main_watch}
    if not argv or argv[0] not in tools:
        print("usage: python -m broadcaster.clients.imagetools {send|watch} ...", file=sys.stderr)
        return EXIT_USAGE
    return tools[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
