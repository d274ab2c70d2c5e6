"""
``--workers N``: one master process and N worker processes that share its
listening sockets and act as one server through Redis.

The master (:class:`MasterService`) serves no clients.  It binds each
listening port once (``--port``, ``--image-port``, ``--line-port``,
``--metrics-port``) and never accepts on them; unless given ``--redis`` it
starts a private ``redis-server`` on a Unix socket in a temporary directory;
then it runs N workers, each ``twistd -n broadcaster`` with the user's
options (less the secrets, and ``--redis`` without its password) followed
by these internal ones::

    --workers 1 --worker-fds port=3,image=4,line=5 --node-id <node>-w<i>
    --log-format json [--redis unix:<dir>/redis.sock]

The secrets (webhook secret, API keys, Redis password) reach the workers
in their environment, which only their user can read, never on their
command line, which every local user can (see
:mod:`broadcaster.service.secrets`).  The private Redis has no password:
only the master's user may use its socket.

A worker's file descriptors:

====  =====================================================================
0     a pipe the master never writes to: end of file means the master is
      gone, and the worker shuts down as on SIGTERM
1     its log, one JSON event per line; the master publishes each event
      in its own log, the worker's name (``w0``) in front
2     anything else it writes (a traceback before logging starts), logged
      by the master as a warning
3...  the listening sockets, in the order of ``--worker-fds``; the worker
      adopts them (``adoptStreamPort``) where it would have listened.  An
      ``ssl:`` port is a plain TCP socket: each worker wraps TLS itself.
====  =====================================================================

Ports that can be shared: ``tcp:``, ``tcp6:`` and ``ssl:``.  Not ``unix:``
(the first worker to stop would remove the socket's file from under the
others), nor endpoints of other kinds.

A worker that dies is logged (exit status or signal) and restarted after
0.5 s, doubling for each death within 10 s of its start, up to 30 s.  A
restarted worker gets a new node id (``<node>-w0.1``, ``.2`` ...): its
predecessor's registration in Redis lives on until ``--node-timeout``, and
the new process must not wait for it; the other workers announce the dead
one's clients as gone, as for any dead node.

On SIGTERM or SIGINT the master closes its copies of the listening sockets,
sends SIGTERM to every worker (each drains its clients, as a single server
does), waits for them up to the drain timeout plus a margin, kills what is
left, stops its private Redis, and exits 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import endpoints, main
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from broadcaster.service.listening import describe_address
from broadcaster.service.signals import handle_stop_signals
from broadcaster import __version__

#: The listening ports a worker may be handed, as named in ``--worker-fds``,
#: with the option that describes each.
LISTENER_FLAGS = (
    ("port", "port"),
    ("image", "image-port"),
    ("line", "line-port"),
    ("metrics", "metrics-port"),
)

#: Endpoint kinds whose listening socket workers can share.
SHAREABLE_KINDS = ("tcp", "tcp6", "ssl")

#: Seconds before a dead worker (or private Redis) is restarted, doubled for
#: each death within STABLE_AFTER seconds of its start, up to MAX_RESTART_DELAY.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0

#: Seconds the private redis-server has to accept connections before the
#: workers are started anyway (they keep trying to reach it).
REDIS_READY_TIMEOUT = 10.0

#: Seconds the private redis-server has to exit on SIGTERM before SIGKILL.
REDIS_STOP_TIMEOUT = 5.0

#: How a worker runs twistd: as ``python -c``, so it needs no console script.
TWISTD = "from twisted.scripts.twistd import run; run()"

#: How the private redis-server is started: through Python, which asks Linux
#: to send it SIGTERM should the master die without stopping it (the
#: setting, PR_SET_PDEATHSIG, survives exec), then becomes redis-server.
#: Arguments: the master's pid, then redis-server's command line.
REDIS_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass  # not Linux\n"
    "if os.getppid() == int(sys.argv[1]):  # else the master is gone already\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
)

#: Lines of the private redis-server's output kept to explain its death.
_REDIS_TAIL = 20

#: A line a child writes without a newline is cut at this many bytes.
_MAX_LINE = 1024 * 1024

#: The usage error of --workers without --redis on a machine without Redis.
NO_REDIS = "--workers needs redis-server (apt-get install redis-server) or --redis URL"


# Options


def sharing_problem(description: str) -> Optional[str]:
    """
    Why workers cannot share a listening endpoint, or ``None`` if they can.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind.isdigit() or kind in SHAREABLE_KINDS:
        return None
    return (
        "--workers shares tcp:, tcp6: and ssl: ports only"
        + (
            " (a unix: socket's file would be removed by the first worker to stop)"
            if kind == "unix"
            else ""
        )
    )


def parse_worker_fds(text: str) -> Dict[str, int]:
    """
    Parse ``--worker-fds port=3,image=4``.

    :raise ValueError: with the reason.
    """
    names = [name for name, _ in LISTENER_FLAGS]
    fds: Dict[str, int] = {}
    for item in text.split(","):
        name, equals, number = item.partition("=")
        if not equals or name not in names or not number.isdigit():
            raise ValueError("expected NAME=FD,... with NAME one of {}".format(", ".join(names)))
        if name in fds:
            raise ValueError("{} given twice".format(name))
        fds[name] = int(number)
    return fds


def find_redis_server() -> Optional[str]:
    """
    The ``redis-server`` executable to start a private Redis with, if any.
    """
    found = shutil.which("redis-server")
    if found is not None:
        return found
    # Debian's path, in case PATH (e.g. of a service manager) lacks /usr/bin.
    for path in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(path, os.X_OK):
            return path
    return None


def redis_server_argv(executable: str, directory: str) -> List[str]:
    """
    The command line of the private Redis: no TCP port, a Unix socket only
    the master's user may use, no persistence.
    """
    return [
        executable,
        "--port", "0",
        "--unixsocket", os.path.join(directory, "redis.sock"),
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "no",
        "--dir", directory,
    ]


def restart_delay(quick_deaths: int) -> float:
    """
    Seconds to wait before restarting a child that has died
    ``quick_deaths`` times in a row soon after starting.
    """
    return min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** min(quick_deaths, 16))


def describe_exit(reason: Failure) -> str:
    """
    ``exited with status 1`` or ``was killed by SIGKILL``.
    """
    number = getattr(reason.value, "signal", None)
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "signal {}".format(number)
        return "was killed by {}".format(name)
    return "exited with status {}".format(getattr(reason.value, "exitCode", None))


# The worker's side


class InheritedPortReactor:
    """
    The reactor one listening endpoint of a worker sees: where the endpoint
    would listen, it adopts the socket the master passed on ``fd`` instead.
    Everything else is the real reactor's.

    Endpoint parsing is left to the endpoint (an ``ssl:`` description's
    certificate options included); TLS is added here as the reactor's own
    ``listenSSL`` does, in memory over the adopted TCP socket.
    """

    def __init__(self, reactor, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface="") -> IListeningPort:
        return self._adopt(factory)

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface="") -> IListeningPort:
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def _adopt(self, factory) -> IListeningPort:
        # The socket knows its own address family.
        probe = socket.socket(fileno=self._fd)
        family = probe.family
        probe.detach()
        port = self._reactor.adoptStreamPort(self._fd, family, factory)
        # adoptStreamPort works on a duplicate of the descriptor.
        os.close(self._fd)
        return port


@implementer(IReadDescriptor)
class _MasterPipe:
    """
    The read end of the pipe on a worker's standard input; the master never
    writes to it, so it becomes readable only at end of file, when the
    master is gone.
    """

    def __init__(self, fd: int, gone: Callable[[], None]) -> None:
        self._fd = fd
        self._gone = gone

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "master-pipe"

    def doRead(self):
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return main.CONNECTION_DONE
        return None

    def connectionLost(self, reason) -> None:
        self._gone()


class MasterWatchService(Service):
    """
    A worker's watch on its master: when the master goes away without
    stopping it (killed, crashed), the worker shuts down as on SIGTERM, so
    that no orphan keeps serving on the shared ports.
    """

    _log = Logger()

    def __init__(self, reactor, fd: int = 0) -> None:
        self._reactor = reactor
        self._pipe = _MasterPipe(fd, self._master_gone)

    def startService(self) -> None:
        super().startService()
        self._reactor.addReader(self._pipe)

    def stopService(self):
        self._reactor.removeReader(self._pipe)
        return super().stopService()

    def _master_gone(self) -> None:
        if not self.running:
            return
        self._log.warn("the --workers master process is gone; shutting down")
        self._reactor.stop()


# The master's side


class _RefuseAll(Factory):
    """
    The factory of the master's own listening ports, which never accept:
    should one ever, the connection is closed at once.
    """

    noisy = False

    def logPrefix(self) -> str:
        # "<this> starting on 9999", as the port logs it.
        return "Master socket (the workers accept)"

    def buildProtocol(self, addr):
        return None


def bind_listening_port(reactor, description: str) -> IListeningPort:
    """
    Listen on ``description`` without accepting: the port is bound and
    listening, but not watched by the reactor, so that only the workers
    accept connections on it.

    :raise Exception: what listening raised (address in use, ...).
    """
    endpoint = endpoints.serverFromString(reactor, description)
    result: list = []
    endpoint.listen(_RefuseAll()).addBoth(result.append)
    if not result:  # pragma: no cover - tcp and ssl listen at once
        raise RuntimeError("{} did not listen at once".format(description))
    if isinstance(result[0], Failure):
        result[0].raiseException()
    port = result[0]
    port.stopReading()
    return port


class ChildProcess(ProcessProtocol):
    """
    A child of the master: its output, line by line, goes to ``on_line(child,
    fd, line)``; its end to ``on_end(child, reason)``.

    :ivar name: ``w0`` for a worker, ``redis`` for the private Redis.
    :ivar reason: why it ended, once it has.
    """

    def __init__(self, name: str, on_line, on_end) -> None:
        self.name = name
        self._on_line = on_line
        self._on_end = on_end
        self._buffers: Dict[int, bytes] = {}
        self.pid: Optional[int] = None
        self.started = 0.0
        self.node: Optional[str] = None
        self.reason: Optional[Failure] = None
        self.tail: Deque[str] = deque(maxlen=_REDIS_TAIL)
        self._waiting: List[Deferred] = []

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buffered = self._buffers.get(fd, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > _MAX_LINE:
            lines.append(rest)
            rest = b""
        self._buffers[fd] = rest
        for line in lines:
            self._on_line(self, fd, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in sorted(self._buffers.items()):
            if rest:
                self._on_line(self, fd, rest)
        self._buffers = {}
        self.reason = reason
        self._on_end(self, reason)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    @property
    def running(self) -> bool:
        return self.reason is None

    def when_ended(self) -> Deferred:
        if self.reason is not None:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


class MasterService(Service):
    """
    The master process of ``--workers N``: binds the listening ports, runs
    the workers and (without ``--redis``) a private Redis, restarts what
    dies, and stops it all on SIGTERM.

    :param reactor: the reactor to listen with, spawn processes with and
        take time from.
    :param count: how many workers.
    :param listeners: ``(name, description, what)`` for each listening
        port, ``name`` as in ``--worker-fds`` and ``what`` for the log.
    :param worker_args: the user's ``twistd broadcaster`` options, given to
        every worker ahead of the internal ones; no secrets, as every local
        user can read a command line.
    :param node_id: the workers' node ids are ``<node_id>-w<i>``.
    :param stop_timeout: seconds the workers have to finish after SIGTERM
        before they are killed.
    :param redis_server: the ``redis-server`` executable to run a private
        Redis with, or ``None`` when ``worker_args`` hold ``--redis``.
    :param spawn: ``reactor.spawnProcess`` or a stand-in.
    :param bind: ``bind(reactor, description)`` returns a listening port
        that does not accept (:func:`bind_listening_port` or a stand-in).
    :param python: the interpreter the workers run on.
    :param worker_env: environment variables set in every worker's
        environment (a string) or removed from it (``None``): the secrets.
        None of them reaches the private Redis.
    """

    _log = Logger()

    #: Whether SIGTERM and SIGINT are ours to handle (as twistd runs us).
    handle_signals = False

    def __init__(
        self,
        reactor,
        count: int,
        listeners: Sequence[Tuple[str, str, str]],
        worker_args: Sequence[str],
        node_id: str,
        stop_timeout: float,
        redis_server: Optional[str] = None,
        spawn: Optional[Callable] = None,
        bind: Callable = bind_listening_port,
        python: str = sys.executable,
        worker_env: Optional[Mapping[str, Optional[str]]] = None,
    ) -> None:
        self._reactor = reactor
        self.count = count
        self._listeners = list(listeners)
        self._worker_args = list(worker_args)
        self.node_id = node_id
        self.stop_timeout = stop_timeout
        self._redis_server = redis_server
        self._spawn_function = spawn
        self._bind = bind
        self._python = python
        self._worker_env = dict(worker_env or {})
        #: name -> the master's listening port
        self.ports: Dict[str, IListeningPort] = {}
        #: the current process of each worker slot, once started
        self.workers: List[Optional[ChildProcess]] = [None] * count
        self._generations = [0] * count
        self._quick_deaths: Dict[str, int] = {}
        self._restarts: Dict[str, object] = {}
        self._workers_started = False
        self._ready_poll = None
        self.redis: Optional[ChildProcess] = None
        self.redis_directory: Optional[str] = None

    # Start-up

    def _spawn(self, *args, **kwargs):
        spawn = self._spawn_function
        if spawn is None:
            spawn = self._reactor.spawnProcess
        return spawn(*args, **kwargs)

    @property
    def redis_socket(self) -> Optional[str]:
        if self.redis_directory is None:
            return None
        return os.path.join(self.redis_directory, "redis.sock")

    def privilegedStartService(self) -> None:
        # Bind before twistd drops privileges, as listening services do.
        self._log.info(
            "broadcaster {version} starting {count} workers (node {node})",
            version=__version__,
            count=self.count,
            node=self.node_id,
        )

        for name, description, what in self._listeners:
            port = self._bind(self._reactor, description)
            self.ports[name] = port
            self._log.info(
                "{what} listening on {address} (accepted by the workers)",
                what=what,
                address=describe_address(port.getHost()),
            )
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if self.handle_signals:
            self._reactor.callWhenRunning(self._handle_stop_signals)
        if self._redis_server is None:
            self._start_workers()
            return
        self.redis_directory = tempfile.mkdtemp(prefix="broadcaster-")
        self._start_redis()
        deadline = self._reactor.seconds() + REDIS_READY_TIMEOUT
        self._poll_redis(deadline)

    def _handle_stop_signals(self) -> None:
        # As BroadcasterService does: drain (here: the workers), exit 0.
        handle_stop_signals(self._reactor, self._log, "stopping the workers")

    # The private Redis

    def _start_redis(self) -> None:
        self._restarts.pop("redis", None)
        child = ChildProcess("redis", self._redis_line, self._redis_ended)
        argv = [
            self._python, "-c", REDIS_LAUNCHER, str(os.getpid()),
            *redis_server_argv(self._redis_server, self.redis_directory),
        ]
        child.started = self._reactor.seconds()
        self.redis = child
        env = {name: value for name, value in os.environ.items() if name not in self._worker_env}
        if not self._spawned(child, argv, env, {0: "w", 1: "r", 2: "r"}, self._start_redis):
            return
        self._log.info(
            "private redis-server started (pid {pid}) on unix:{socket}",
            pid=child.pid,
            socket=self.redis_socket,
        )

    def _poll_redis(self, deadline: float) -> None:
        self._ready_poll = None
        if not self.running:
            return
        if _accepts(self.redis_socket):
            self._start_workers()
        elif self._reactor.seconds() >= deadline:
            self._log.error(
                "the private redis-server did not accept connections within {timeout:g} s;"
                " starting the workers anyway (they keep trying to reach it)",
                timeout=REDIS_READY_TIMEOUT,
            )
            self._start_workers()
        else:
            self._ready_poll = self._reactor.callLater(0.05, self._poll_redis, deadline)

    def _redis_line(self, child: ChildProcess, fd: int, line: bytes) -> None:
        child.tail.append(line.decode("utf-8", "replace").rstrip())

    def _redis_ended(self, child: ChildProcess, reason: Failure) -> None:
        if not self.running:
            self._log.info("private redis-server {status}", status=describe_exit(reason))
            return
        delay = self._schedule_restart("redis", child, self._start_redis)
        self._log.error(
            "private redis-server (pid {pid}) {status}; restarting it in {delay:g} s"
            " (the workers serve their own clients meanwhile).  Its last output:\n{output}",
            pid=child.pid,
            status=describe_exit(reason),
            delay=delay,
            output="\n".join(child.tail),
        )

    # Workers

    def _start_workers(self) -> None:
        if self._workers_started:
            return
        self._workers_started = True
        for index in range(self.count):
            self._start_worker(index)

    def worker_argv(self, index: int) -> List[str]:
        """
        The command line of worker ``index`` in its current generation.
        """
        fds = ",".join(
            "{}={}".format(name, 3 + i) for i, name in enumerate(self.ports)
        )
        extra = [
            "--workers", "1",
            "--worker-fds", fds,
            "--node-id", self._worker_node(index),
            "--log-format", "json",
        ]
        if self.redis_socket is not None:
            extra += ["--redis", "unix:" + self.redis_socket]
        return [
            self._python, "-c", TWISTD, "-n", "--pidfile=", "broadcaster",
            *self._worker_args, *extra,
        ]

    def worker_environment(self) -> Dict[str, str]:
        """
        A worker's environment: the master's, with the secrets set or removed.
        """
        env = dict(os.environ)
        for name, value in self._worker_env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def _worker_node(self, index: int) -> str:
        generation = self._generations[index]
        suffix = ".{}".format(generation) if generation else ""
        return "{}-w{}{}".format(self.node_id, index, suffix)

    def _start_worker(self, index: int) -> None:
        name = "w{}".format(index)
        self._restarts.pop(name, None)
        child = ChildProcess(name, self._worker_line, self._worker_ended)
        child.node = self._worker_node(index)
        fds: Dict[int, object] = {0: "w", 1: "r", 2: "r"}
        for i, port in enumerate(self.ports.values()):
            fds[3 + i] = port.fileno()
        child.started = self._reactor.seconds()
        self.workers[index] = child
        argv, env = self.worker_argv(index), self.worker_environment()
        if not self._spawned(child, argv, env, fds, lambda: self._start_worker(index)):
            return
        self._log.info(
            "worker {worker} started (pid {pid}, node {node})",
            worker=name,
            pid=child.pid,
            node=child.node,
        )

    def _spawned(self, child: ChildProcess, argv: List[str], env, fds, retry) -> bool:
        """
        Start ``child``; if that fails (out of processes or descriptors...),
        log it and try again later.
        """
        try:
            self._spawn(child, argv[0], argv, env=env, childFDs=fds)
        except Exception:
            child.reason = Failure()
            delay = self._schedule_restart(child.name, child, retry)
            self._log.failure(
                "could not start {name}; trying again in {delay:g} s",
                child.reason,
                name=child.name,
                delay=delay,
            )
            return False
        child.pid = child.transport.pid
        return True

    def _worker_line(self, child: ChildProcess, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        if fd == 1:
            try:
                event = eventFromJSON(text)
            except ValueError:
                event = None
            if isinstance(event, dict):
                namespace = event.get("log_namespace", "-")
                level = event.get("log_level")
                system = event.get("log_system")
                if system in (None, "-"):
                    system = "{}#{}".format(namespace, getattr(level, "name", "-"))
                event["log_system"] = "{} {}".format(child.name, system)
                event["worker"] = child.name
                event["worker_pid"] = child.pid
                globalLogPublisher(event)
                return
            self._log.info("{worker}: {line}", worker=child.name, line=text)
        else:
            self._log.warn("{worker} (stderr): {line}", worker=child.name, line=text)

    def _worker_ended(self, child: ChildProcess, reason: Failure) -> None:
        status = describe_exit(reason)
        index = int(child.name[1:])
        if not self.running:
            self._log.info(
                "worker {worker} (pid {pid}) {status}",
                worker=child.name,
                pid=child.pid,
                status=status,
            )
            return
        self._generations[index] += 1
        delay = self._schedule_restart(child.name, child, lambda: self._start_worker(index))
        self._log.error(
            "worker {worker} (pid {pid}, node {node}) {status} after {lived:.1f} s;"
            " restarting it in {delay:g} s",
            worker=child.name,
            pid=child.pid,
            node=child.node,
            status=status,
            lived=self._reactor.seconds() - child.started,
            delay=delay,
        )

    def _schedule_restart(self, key: str, child: ChildProcess, start: Callable[[], None]) -> float:
        """
        Restart a dead child after a delay that grows while it keeps dying
        soon after starting.
        """
        if self._reactor.seconds() - child.started >= STABLE_AFTER:
            self._quick_deaths[key] = 0
        quick = self._quick_deaths.get(key, 0)
        self._quick_deaths[key] = quick + 1
        delay = restart_delay(quick)
        self._restarts[key] = self._reactor.callLater(delay, start)
        return delay

    # Shutdown

    def stopService(self) -> Deferred:
        """
        Stop accepting, have every worker finish (SIGTERM, then SIGKILL
        after ``stop_timeout``), then stop the private Redis.
        """
        if not self.running:
            return succeed(None)
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts = {}
        if self._ready_poll is not None and self._ready_poll.active():
            self._ready_poll.cancel()
        self._ready_poll = None
        closing = [maybeDeferred(port.stopListening) for port in self.ports.values()]
        d = DeferredList(closing)
        d.addCallback(lambda _: self._stop_workers())
        d.addCallback(lambda _: self._stop_redis())
        d.addCallback(lambda _: None)
        return d

    def _stop_workers(self) -> Deferred:
        live = [child for child in self.workers if child is not None and child.running]
        if not live:
            return succeed(None)
        self._log.info(
            "stopping {count} workers (waiting up to {timeout:g} s)",
            count=len(live),
            timeout=self.stop_timeout,
        )
        for child in live:
            child.signal("TERM")
        return self._wait(live, self.stop_timeout, "worker")

    def _stop_redis(self) -> Deferred:
        child = self.redis
        if child is None or not child.running:
            return succeed(self._remove_redis_directory())
        child.signal("TERM")
        d = self._wait([child], REDIS_STOP_TIMEOUT, "private redis-server")
        d.addCallback(lambda _: self._remove_redis_directory())
        return d

    def _wait(self, children: List[ChildProcess], timeout: float, what: str) -> Deferred:
        """
        Wait for ``children`` to end, killing those still running after
        ``timeout`` seconds.
        """

        def kill() -> None:
            for child in children:
                if child.running:
                    self._log.warn(
                        "{what} {name} (pid {pid}) did not finish within {timeout:g} s;"
                        " killing it",
                        what=what,
                        name=child.name,
                        pid=child.pid,
                        timeout=timeout,
                    )
                    child.signal("KILL")

        timer = self._reactor.callLater(timeout, kill)
        d = DeferredList([child.when_ended() for child in children])

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    def _remove_redis_directory(self) -> None:
        if self.redis_directory is not None:
            shutil.rmtree(self.redis_directory, ignore_errors=True)


def _accepts(path: Optional[str]) -> bool:
    """
    Whether a Unix socket at ``path`` accepts connections now (a connect on
    a Unix socket does not block).
    """
    if path is None:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
