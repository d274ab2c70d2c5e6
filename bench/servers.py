"""
The servers under test, and running one as a subprocess.

- ``broadcaster``: as a user runs it, ``twistd -n broadcaster`` with the
  repository on ``PYTHONPATH``, on a free loopback port, with the image port
  and line bridge off and ``--rate 0`` (the benchmark's publisher sends far
  more than 100 messages a second); every other option at its default
  (JSON mode, rooms, history and metrics all on).
- ``autobahn``: :file:`bench/ref_autobahn.py`, a minimal Autobahn broadcast
  server that frames each message once: the floor broadcaster is compared with.
- ``websockets``: :file:`bench/ref_websockets.py`, a minimal server on the
  ``websockets`` library's ``broadcast`` (asyncio).
- ``picows``: :file:`bench/ref_picows.py`, a minimal server on picows, whose
  framing is compiled (Cython): what one send per client costs with almost
  no Python in the way.

Each runs in a session of its own, pinned to one CPU, with its open files
limit raised to the hard limit, its output in a log file; :meth:`ServerProcess.stop`
ends it with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

TWISTD = "from twisted.scripts.twistd import run; run()"


class ServerError(Exception):
    """A server did not start, or died."""


def free_port() -> int:
    """A loopback port nothing listens on now (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> Dict[str, str]:
    path = [str(REPO_ROOT)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1")


@dataclass(frozen=True)
class ServerSpec:
    """
    One server the benchmark can run.

    :ivar name: what ``--servers`` calls it.
    :ivar label: what the table calls it.
    :ivar argv: the command line, given the port.
    :ivar requires: modules it needs, each with how to install it.
    :ivar greets: whether it sends every new connection a first message
        (broadcaster's plain mode: the announcement of its arrival).
    :ivar cwd: the directory it runs in (``None``: the repository).  It
        matters: ``python -c`` puts its working directory first on
        ``sys.path``, ahead of ``PYTHONPATH``.  A ``--baseline``'s is where
        its revision was unpacked.
    """

    name: str
    label: str
    description: str
    argv: Callable[[int], List[str]]
    requires: Dict[str, str] = field(default_factory=dict)
    greets: bool = False
    cwd: Optional[str] = None

    def missing(self) -> Optional[str]:
        """
        Why this server cannot run here (a module it needs is not installed,
        with the command that installs it), or ``None``.
        """
        for module, install in self.requires.items():
            if importlib.util.find_spec(module) is None:
                return "needs the {} module: {}".format(module, install)
        return None

    def options(self) -> FrozenSet[str]:
        """
        The command-line flags this server accepts (from ``--help``), so
        scenarios can tell whether it has ``--redis`` or ``--workers``.
        Only broadcaster (and a ``--baseline`` of it) has any.
        """
        return _OPTIONS_CACHE.setdefault(self.name, self._read_options())

    def _read_options(self) -> FrozenSet[str]:
        if self.name not in ("broadcaster", "baseline"):
            return frozenset()
        # A --baseline's own package: from its directory, on its path.
        env = _env() if self.cwd is None else dict(_env(), PYTHONPATH=self.cwd)
        try:
            out = subprocess.run(
                [sys.executable, "-c", TWISTD, "broadcaster", "--help"],
                capture_output=True,
                env=env,
                cwd=self.cwd or str(REPO_ROOT),
                timeout=60,
            ).stdout.decode(errors="replace")
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        flags = set()
        for word in out.split():
            if word.startswith("--"):
                flags.add(word.split("=")[0].rstrip(",:"))
        return frozenset(flags)


_OPTIONS_CACHE: Dict[str, FrozenSet[str]] = {}


def _broadcaster_argv(port: int) -> List[str]:
    return [
        sys.executable, "-c", TWISTD, "-n", "--pidfile=", "broadcaster",
        "--port", "tcp:{}:interface=127.0.0.1".format(port),
        "--image-port", "none", "--line-port", "none", "--rate", "0",
    ]


def _c_ref_argv(port: int) -> List[str]:
    # Compiled on first use (cached by its source and compiler, as the
    # load generator is).
    from bench.loadgen import build

    return [str(build(source=BENCH_DIR / "ref_c.c")), str(port)]


SERVERS: Dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "broadcaster",
            "broadcaster",
            "twistd -n broadcaster (this repository), defaults but --rate 0",
            _broadcaster_argv,
            {"twisted": "pip install .", "autobahn": "pip install ."},
            greets=True,
        ),
        ServerSpec(
            "autobahn",
            "autobahn-ref",
            "bench/ref_autobahn.py: Autobahn, prepareMessage + sendPreparedMessage",
            lambda port: [sys.executable, str(BENCH_DIR / "ref_autobahn.py"), str(port)],
            {"autobahn": "pip install autobahn"},
        ),
        ServerSpec(
            "websockets",
            "websockets-ref",
            "bench/ref_websockets.py: websockets.broadcast on asyncio",
            lambda port: [sys.executable, str(BENCH_DIR / "ref_websockets.py"), str(port)],
            {"websockets": "pip install websockets"},
        ),
        ServerSpec(
            "c",
            "c-ref",
            "bench/ref_c.c: epoll in C, each turn's messages framed once, one send() per"
            " client: the physical limit",
            _c_ref_argv,
        ),
        ServerSpec(
            "python",
            "python-ref",
            "bench/ref_python.py: ref_c.c in pure Python (epoll, each turn's messages framed"
            " once, one send() per client): what the interpreter allows",
            lambda port: [sys.executable, str(BENCH_DIR / "ref_python.py"), str(port)],
        ),
        ServerSpec(
            "picows",
            "picows-ref",
            "bench/ref_picows.py: picows (Cython) on asyncio, one send per client",
            lambda port: [sys.executable, str(BENCH_DIR / "ref_picows.py"), str(port)],
            {"picows": "pip install picows"},
        ),
    )
}

def add_baseline(revision: str) -> ServerSpec:
    """
    Register ``broadcaster@REVISION``: broadcaster as it was at a git
    revision of this repository, unpacked into a temporary directory, so that
    one run measures a change before and after on the same machine in the
    same minutes (figures vary twofold between machines and hours).

    :raise ServerError: if the revision cannot be unpacked.
    """
    directory = tempfile.mkdtemp(prefix="broadcaster-bench-baseline-")
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision],
            capture_output=True, check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise ServerError("--baseline {}: cannot unpack it ({})".format(revision, e))

    def argv(port: int) -> List[str]:
        # Its directory first on the path: its broadcaster package and its
        # plugin shadow this checkout's.
        return ["env", "PYTHONPATH=" + directory] + _broadcaster_argv(port)

    spec = ServerSpec(
        "baseline",
        "broadcaster@{}".format(revision),
        "twistd -n broadcaster as of git revision {}, defaults but --rate 0".format(revision),
        argv,
        {"twisted": "pip install .", "autobahn": "pip install ."},
        greets=True,
        # Run from this checkout, python -c would import this checkout's
        # broadcaster first, whatever PYTHONPATH says.
        cwd=directory,
    )
    SERVERS[spec.name] = spec
    return spec


#: The server every figure is compared with.
REFERENCE = "autobahn"

#: The server that shows what the machine allows (bench/ref_c.c): figures
#: are also given as a ratio to its, when it ran.
LIMIT = "c"


def lookup(name: str) -> ServerSpec:
    """
    The server called ``name`` (``autobahn-ref`` works for ``autobahn``).

    :raise KeyError: if there is none.
    """
    for spec in SERVERS.values():
        if name in (spec.name, spec.label):
            return spec
    raise KeyError(name)


def die_with_parent() -> None:
    """
    In a child about to exec: have the kernel send it SIGTERM if the
    benchmark dies (even by SIGKILL), so that no server outlives it.
    Linux only; elsewhere nothing happens.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _preexec(cpu: Optional[int]):
    def preexec() -> None:
        die_with_parent()
        # Every connection is a file descriptor.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return preexec


def read_rss_kib(pid: int) -> int:
    """The resident set size of process ``pid``, in KiB."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ServerError("no VmRSS for process {}".format(pid))


def read_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far, in seconds."""
    with open("/proc/{}/stat".format(pid)) as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """
    A server running on a free loopback port, as a context manager that
    always stops it.
    """

    def __init__(self, spec: ServerSpec, cpu: Optional[int], log_path: Path) -> None:
        self.spec = spec
        self.cpu = cpu
        self.log_path = log_path
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.stopped: Optional[Dict] = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> "ServerProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.spec.argv(self.port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.spec.cwd or str(REPO_ROOT),
                env=_env(),
                preexec_fn=_preexec(self.cpu),
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc_info) -> None:
        if self.stopped is None:
            self.stop(grace=2.0)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 60.0) -> float:
        """
        Wait until the server accepts TCP connections.

        :return: seconds it took.
        :raise ServerError: if it exits or the deadline passes first.
        """
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise ServerError(
                    "{} exited with status {} at start-up:\n{}".format(
                        self.spec.label, self.proc.returncode, self.log_tail()
                    )
                )
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise ServerError(
                    "{} did not listen on port {} within {:.0f} s".format(
                        self.spec.label, self.port, timeout
                    )
                )
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        return read_rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return read_cpu_seconds(self.pid)

    def stop(self, grace: float) -> Dict:
        """
        SIGTERM, then SIGKILL (to its whole session) if it has not exited
        within ``grace`` seconds.

        :return: ``{"status": ..., "seconds": ..., "killed": ...}``.
        """
        proc = self.proc
        started = time.monotonic()
        killed = False
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                killed = True
        if killed:
            # Still running (and not reaped), so its process group is ours:
            # anything it started goes with it.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.stopped = {
            "status": proc.returncode,
            "seconds": round(time.monotonic() - started, 3),
            "killed": killed,
        }
        return self.stopped


def with_args(spec: ServerSpec, extra: List[str], label: Optional[str] = None) -> ServerSpec:
    """``spec`` with ``extra`` appended to its command line."""
    base = spec.argv
    return dataclasses.replace(
        spec, label=label or spec.label, argv=lambda port: base(port) + list(extra)
    )


def redis_server_path() -> Optional[str]:
    """The ``redis-server`` executable, or ``None`` if there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None


def healthz(port: int, timeout: float = 2.0) -> Optional[Dict]:
    """broadcaster's ``/healthz`` on ``port`` as a dict, or ``None`` if it did not answer."""
    try:
        # No proxy: an http_proxy in the environment must not see loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open("http://127.0.0.1:{}/healthz".format(port), timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def wait_backplane(
    server: "ServerProcess", nodes: int = 1, distinct: int = 1, timeout: float = 60.0
) -> Dict:
    """
    Wait until ``server``'s ``/healthz`` says its backplane is connected and
    sees ``nodes`` nodes, from ``distinct`` different nodes (``--workers``:
    each request reaches one worker, whichever accepts it).

    :return: the last answer per node.
    :raise ServerError: if the server exits or the deadline passes first.
    """
    started = time.monotonic()
    seen: Dict[str, Dict] = {}
    while True:
        if not server.alive():
            raise ServerError(
                "{} exited at start-up:\n{}".format(server.spec.label, server.log_tail())
            )
        state = healthz(server.port)
        if state is not None:
            backplane = state.get("backplane") or {}
            if backplane.get("connected") and backplane.get("nodes", 1) >= nodes:
                seen[state.get("node")] = state
                if len(seen) >= distinct:
                    return seen
        if time.monotonic() - started > timeout:
            raise ServerError(
                "{} on port {}: backplane not ready within {:.0f} s (saw {}; last {}):\n{}".format(
                    server.spec.label, server.port, timeout, sorted(seen), state,
                    server.log_tail(),
                )
            )
        time.sleep(0.05 if state is not None else 0.2)


def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (children, their children ...), from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(entry)) as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class RedisProcess:
    """
    A throw-away ``redis-server`` on a free loopback port, without
    persistence, in a temporary directory; a context manager that always
    stops it (SIGTERM, then SIGKILL) and removes the directory.
    """

    def __init__(self, cpu: Optional[int], log_path: Path) -> None:
        self.cpu = cpu
        self.log_path = log_path
        self.port = free_port()
        self.directory: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:{}/0".format(self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> "RedisProcess":
        exe = redis_server_path()
        if exe is None:
            raise ServerError("redis-server is not installed (apt-get install redis-server)")
        self.directory = tempfile.mkdtemp(prefix="broadcaster-bench-redis-")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    exe, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", self.directory,
                    "--logfile", "",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_preexec(self.cpu),
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until it answers PING; :return: seconds it took."""
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise ServerError(
                    "redis-server exited with status {}:\n{}".format(
                        self.proc.returncode, self.log_path.read_text(errors="replace")[-800:]
                    )
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return time.monotonic() - started
            except OSError:
                pass
            if time.monotonic() - started > timeout:
                raise ServerError("redis-server did not answer within {:.0f} s".format(timeout))
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> Optional[int]:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        return proc.returncode if proc is not None else None
