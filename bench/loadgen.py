"""
Building and driving the C load generator (:file:`bench/loadgen.c`).

The source is compiled on first use with the system C compiler (``$CC``,
else ``cc``, ``gcc`` or ``clang``) into a cache directory, under a name
derived from the source and the compiler, so an edit rebuilds it and
nothing else does.  The generator prints one JSON line per result on its
standard output and keeps its connections open until its standard input
ends: :class:`LoadGen` reads those lines with a deadline and closes its
input when the run is over.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SOURCE = Path(__file__).with_name("loadgen.c")
#: What both C programs include (bench/wsutil.h): part of every build's key.
SHARED_HEADER = Path(__file__).with_name("wsutil.h")
CFLAGS = ("-O2", "-Wall")


class BuildError(Exception):
    """The load generator could not be compiled (no compiler, or it failed)."""


class LoadGenError(Exception):
    """The load generator failed, exited early or missed a deadline."""


def find_compiler() -> Optional[str]:
    """
    The C compiler to build with: ``$CC`` if set, else the first of ``cc``,
    ``gcc`` and ``clang`` on ``PATH``; ``None`` if there is none.
    """
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def default_cache_dir() -> Path:
    """
    ``$XDG_CACHE_HOME/broadcaster-bench`` (``~/.cache/...``), or a
    directory under the system temporary directory if that is not writable.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "broadcaster-bench"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / "broadcaster-bench-{}".format(os.getuid())
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(cache_dir: Optional[Path] = None, source: Path = SOURCE) -> Path:
    """
    Compile the load generator (or another of the benchmark's C programs,
    ``source``) unless an up-to-date build is cached.

    :return: the executable's path.
    :raise BuildError: if there is no C compiler or the build fails.
    """
    cc = find_compiler()
    if cc is None:
        raise BuildError(
            "no C compiler found: the load generator (bench/loadgen.c) is compiled"
            " at run time; install one (e.g. apt-get install gcc) or set CC"
        )
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError("cannot run the C compiler {}: {}".format(cc, e))
    digest = hashlib.sha256()
    for part in (
        source.read_bytes(), SHARED_HEADER.read_bytes(), cc.encode(), version,
        " ".join(CFLAGS).encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / "{}-{}".format(source.stem, digest.hexdigest()[:16])
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    fd, tmp = tempfile.mkstemp(prefix=source.stem + "-", dir=cache)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(source)], capture_output=True, timeout=120
        )
        if result.returncode != 0:
            raise BuildError(
                "{} failed to compile {}:\n{}".format(
                    cc, source, result.stderr.decode(errors="replace")
                )
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, exe)  # atomic: concurrent builds cannot see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return exe


def compiler_version() -> Optional[str]:
    """The first line of ``cc --version``, for the machine description."""
    cc = find_compiler()
    if cc is None:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.decode(errors="replace").splitlines()
    return lines[0] if lines else cc


def _preexec(cpu: Optional[int]):
    from bench.servers import die_with_parent

    def preexec() -> None:
        die_with_parent()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return preexec


class LoadGen:
    """
    One run of the load generator, as a context manager that always ends it.

    :param exe: the built executable.
    :param args: its command-line arguments.
    :param cpu: the CPU to pin it to, or ``None``.
    :param log_path: where its standard error goes.
    """

    def __init__(
        self, exe: Path, args: Sequence[str], cpu: Optional[int], log_path: Path
    ) -> None:
        self.args = [str(exe), *map(str, args)]
        self.cpu = cpu
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        self._buffer = b""

    def __enter__(self) -> "LoadGen":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                preexec_fn=_preexec(self.cpu),
            )
        return self

    def __exit__(self, *exc_info) -> None:
        self.finish()

    def _stderr_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-5:])

    def read_result(self, timeout: float) -> Dict:
        """
        Wait up to ``timeout`` seconds for the next JSON line.

        :raise LoadGenError: if it exits first, prints something that is not
            JSON, or the deadline passes.
        """
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoadGenError(
                    "the load generator gave no result within {:.0f} s".format(timeout)
                )
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                status = self.proc.wait()
                raise LoadGenError(
                    "the load generator exited with status {} before its result: {}".format(
                        status, self._stderr_tail() or "(no message)"
                    )
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise LoadGenError("the load generator printed {!r}, not JSON".format(line[:200]))

    def next_stage(self) -> None:
        """Let an idle-mode run open its next stage of connections."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"next\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 15.0) -> Optional[int]:
        """
        End it: close its standard input (it then closes its connections
        and exits), and kill it if it has not exited within ``timeout``.

        :return: its exit status.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return status


def loadgen_args(**options) -> List[str]:
    """
    ``--name value`` arguments from keyword arguments (``server_pid`` becomes
    ``--server-pid``); ``None`` values are left out.
    """
    args: List[str] = []
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        args += ["--" + name.replace("_", "-"), str(value)]
    return args
