"""
The benchmark's scenarios.  Each one is a :class:`Scenario` with variants
(say, 100 and 1000 subscribers) and the figures it reports; :data:`SCENARIOS`
lists them in order, so adding one is adding a class here.

S1 throughput
    N subscribers and one publisher keeping ``--window`` 64-byte messages
    in flight: a new message whenever one has reached every subscriber.
    Deliveries per second (to subscribers) and the server's CPU time per
    delivery, measured over ``--duration`` seconds after ``--warmup``.
S2 latency
    1000 subscribers, the publisher offering a fixed rate (200 and 20
    messages/s): latency percentiles, from the publisher's send to each
    subscriber's receipt, and messages lost.
S3 idle memory
    Idle connections opened in two stages (a tenth, then all of them): the
    server's RSS growth per connection between the two, and what connecting
    cost (connections per second, server CPU per connection).
S4 cross-node (Redis)
    A redis-server and two broadcaster nodes on it, all on the server CPU:
    S1 at 1000 subscribers with the publisher on node A and every
    subscriber on node B.
S5 workers
    S1 at 1000 subscribers on broadcaster as one process and with
    ``--workers 2``, the server unpinned (the workers need every core).
S6 a big room
    20,000 idle members with 32-character names in the lobby (the load
    generator's), then one JSON client: how long its welcome takes and how
    large it is, and what listing every member with ``who`` costs (time
    and bytes); broadcaster only.
S7 rooms stay where their members are (Redis)
    Two nodes on one redis-server, 100 rooms: node A has the members of
    rooms 0-49, node B those of rooms 50-99, and messages are published in
    rooms 0-49 only (on node A, at a fixed rate).  The CPU each node and
    Redis spend per published message: B's should be near nothing, since
    a node receives only the rooms it has members in.
S8 connection storm
    N connections (5000 and 20,000) opened as fast as the server takes
    them, a few hundred connects and handshakes under way at a time: the
    time until every one has its 101 (and, from a server that greets, its
    first message), connections per second, the server's CPU per
    connection, and each handshake's time.
S9 slow consumers
    S2 at 20 messages/s of 4096 bytes to 1000 subscribers, of which 10 read
    at three quarters of the stream's bandwidth and 1 stops reading: the
    others' latency, beside the same run with every subscriber reading
    (variant ``baseline``), and whether the server cut the stalled one.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.loadgen import LoadGen, loadgen_args
from bench.servers import (
    RedisProcess,
    ServerProcess,
    ServerSpec,
    descendants,
    read_cpu_seconds,
    redis_server_path,
    wait_backplane,
    with_args,
)

#: Load generator CPU use (percent of its core) above which a run is flagged:
#: the generator, not the server, may have been the limit.
LOADGEN_CPU_LIMIT = 80.0

#: Percentage points by which the server's CPU may be busier than the server
#: process before a run is flagged as disturbed by other work on that CPU.
OTHER_LOAD_LIMIT = 15.0


@dataclass(frozen=True)
class Metric:
    """
    A figure a scenario reports.

    :ivar better: ``"higher"``, ``"lower"`` or ``None`` (for information).
    :ivar digits: decimals shown in the table.
    """

    key: str
    label: str
    better: Optional[str]
    digits: int = 1


@dataclass
class Settings:
    """Everything a run depends on, from the command line."""

    warmup: float = 1.0
    duration: float = 5.0
    messages: Optional[int] = None
    window: int = 32
    size: int = 64
    s1_subscribers: Sequence[int] = (100, 1000)
    s2_subscribers: int = 1000
    s2_rates: Sequence[float] = (200.0, 20.0)
    s3_connections: Sequence[int] = (5000,)
    s45_subscribers: int = 1000
    s6_members: Sequence[int] = (20000,)
    storm_connections: Sequence[int] = (5000, 20000)
    storm_concurrency: int = 256
    s9_rate: float = 20.0
    s9_size: int = 4096
    s9_slow: int = 10
    s9_stalled: int = 1
    s9_slow_share: float = 0.75
    s9_max_buffer: int = 65536
    max_connections: int = 1000000
    nofile_limit: Optional[int] = None
    drain_timeout: float = 15.0
    drain_max: float = 60.0
    settle: float = 1.0
    stop_grace: float = 15.0


@dataclass
class Context:
    """What a run needs besides its server and variant."""

    loadgen: Path
    server_cpu: Optional[int]
    loadgen_cpu: Optional[int]
    log_dir: Path
    settings: Settings

    def logs(self, spec: ServerSpec, variant: "Variant", repetition: int) -> Tuple[Path, Path]:
        stem = "{}-{}-{}-r{}".format(
            variant.key.replace("/", "_"), spec.name, variant.slug, repetition
        )
        return self.log_dir / (stem + "-server.log"), self.log_dir / (stem + "-loadgen.log")


@dataclass(frozen=True)
class Variant:
    """One configuration of a scenario, e.g. S1 with 1000 subscribers."""

    key: str
    label: str
    params: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.label)[:40]


class Scenario:
    """
    A kind of measurement.  Subclasses set :attr:`id`, :attr:`title`,
    :attr:`metrics`, and implement :meth:`variants` and :meth:`run`.
    """

    id = ""
    title = ""
    metrics: List[Metric] = []
    #: The figures its chart shows (default: the first four judged ones).
    chart: Optional[List[str]] = None

    def variants(self, settings: Settings) -> List[Variant]:
        raise NotImplementedError

    def unavailable(self, spec: ServerSpec) -> Optional[str]:
        """Why this scenario cannot run on ``spec``, or ``None``."""
        return None

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        """
        Run once.

        :return: ``{"figures": {metric key: value}, "ok": bool, "problems":
            [...], "warnings": [...], ...}`` plus the raw measurements.
        """
        raise NotImplementedError

    def headline(self, figures: Dict[str, float]) -> str:
        """A short line for the progress log."""
        return ", ".join(
            "{} {}".format(_fmt(figures.get(m.key), m.digits), m.label) for m in self.metrics[:2]
        )


def _fmt(value, digits: int) -> str:
    if value is None:
        return "-"
    return "{:,.{}f}".format(value, digits)


def _check_problems(check: Dict, allow_loss: bool = False) -> List[str]:
    """What went wrong in a message run's delivery check, if anything."""
    problems = []
    for key in ("order_errors", "duplicates", "corrupt", "protocol_errors"):
        if check.get(key):
            problems.append("{} {}".format(check[key], key.replace("_", " ")))
    if check.get("lost") and not allow_loss:
        problems.append("{} deliveries lost".format(check["lost"]))
    if check.get("server_closes") or check.get("resets"):
        problems.append(
            "server closed {} and reset {} connections".format(
                check.get("server_closes", 0), check.get("resets", 0)
            )
        )
    return problems


def _connection_problems(result: Dict) -> List[str]:
    """Protocol errors, and server closes and resets, in a connecting run's result."""
    if result["protocol_errors"] or result["server_closes"] or result["resets"]:
        return [
            "{} protocol errors, {} closes, {} resets".format(
                result["protocol_errors"], result["server_closes"], result["resets"]
            )
        ]
    return []


def _loadgen_warnings(loadgen_cpu_pct: Optional[float]) -> List[str]:
    """A warning when the load generator was busy enough to be the limit."""
    if (loadgen_cpu_pct or 0) > LOADGEN_CPU_LIMIT:
        return [
            "load generator at {:.0f}% of its core: it may have been the limit".format(
                loadgen_cpu_pct
            )
        ]
    return []


def _stop_warnings(stopped: Dict, grace: float) -> List[str]:
    """A warning when the server had to be killed."""
    if stopped["killed"]:
        return ["server did not exit within {:.0f} s of SIGTERM; killed".format(grace)]
    return []


def _message_run(
    ctx: Context,
    spec: ServerSpec,
    variant: Variant,
    repetition: int,
    mode: str,
    subscribers: int,
    window: Optional[int] = None,
    rate: Optional[float] = None,
    size: Optional[int] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict:
    """
    Start ``spec``, drive it with a publisher and subscribers, stop it.

    :param size: the message size (default ``--size``).
    :param extra: more load generator options (``slow=10`` for ``--slow 10``).
    """
    server_log, loadgen_log = ctx.logs(spec, variant, repetition)
    with ServerProcess(spec, ctx.server_cpu, server_log) as server:
        startup = server.wait_ready()
        return _drive(
            ctx, server, startup, loadgen_log, mode, subscribers, window=window, rate=rate,
            size=size, extra=extra,
        )


def _known(figure: float) -> Optional[float]:
    """A load generator figure, or ``None`` where it reports -1 (not measured)."""
    return figure if figure >= 0 else None


def _drive(
    ctx: Context,
    server: ServerProcess,
    startup: float,
    loadgen_log: Path,
    mode: str,
    subscribers: int,
    window: Optional[int] = None,
    rate: Optional[float] = None,
    publisher_port: Optional[int] = None,
    server_core: Any = "pinned",
    loadgen_cpu: Any = "pinned",
    stop: Optional[Callable[[], Dict]] = None,
    shared_core: bool = False,
    size: Optional[int] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict:
    """
    Drive a running ``server`` (subscribers on its port, the publisher on
    ``publisher_port`` if given) and stop it with ``stop`` (default: SIGTERM
    to ``server``) while the generator still holds its connections.

    :param server_core: the CPU whose busy time is measured (default the
        server CPU; ``None``: none, the server being unpinned).
    :param shared_core: other processes of the run share the server's CPU
        on purpose (S4), so its being busier than ``server`` is no warning.
    :param size: the message size (default ``--size``).
    :param extra: more load generator options.
    """
    s = ctx.settings
    if server_core == "pinned":
        server_core = ctx.server_cpu
    if loadgen_cpu == "pinned":
        loadgen_cpu = ctx.loadgen_cpu
    if stop is None:
        stop = lambda: server.stop(s.stop_grace)  # noqa: E731
    if True:  # (indented as when this was inside _message_run's ``with``)
        rss_start = server.rss_kib()
        args = loadgen_args(
            port=server.port,
            publisher_port=publisher_port,
            mode=mode,
            subscribers=subscribers,
            window=window,
            rate=rate,
            size=size or s.size,
            warmup=s.warmup,
            duration=s.duration,
            messages=s.messages,
            server_pid=server.pid,
            server_core=server_core,
            drain_timeout=s.drain_timeout,
            drain_max=s.drain_max,
            linger_max=s.stop_grace + 30,
            **(extra or {}),
        )
        deadline = 120 + subscribers * 0.05 + s.warmup + s.duration + s.drain_max
        with LoadGen(ctx.loadgen, args, loadgen_cpu, loadgen_log) as lg:
            result = lg.read_result(timeout=deadline)
            rss_end = server.rss_kib()
            # Stop the server while the generator still holds its
            # connections, so that it answers close frames (broadcaster
            # drains its clients on SIGTERM).
            stopped = stop()
        loadgen_status = lg.proc.returncode
    measured, latency, check = result["measured"], result["latency_us"], result["check"]
    seconds = measured["seconds"] or 1e-9
    figures = {
        "deliveries_per_s": measured["deliveries_per_s"],
        "messages_per_s": measured["messages_per_s"],
        "cpu_us_per_delivery": measured["server_cpu_us_per_delivery"]
        if measured["server_cpu_s"] >= 0
        else None,
        "server_cpu_pct": 100.0 * measured["server_cpu_s"] / seconds
        if measured["server_cpu_s"] >= 0
        else None,
        "core_us_per_delivery": _known(measured["server_core_us_per_delivery"]),
        "server_core_busy_pct": _known(measured["server_core_busy_pct"]),
        "server_core_softirq_pct": _known(measured["server_core_softirq_pct"]),
        "server_core_steal_pct": _known(measured["server_core_steal_pct"]),
        "server_kernel_pct": 100.0 * measured["server_sys_s"] / measured["server_cpu_s"]
        if measured["server_cpu_s"] > 0
        else None,
        "latency_p50_ms": latency["p50"] / 1000.0,
        "latency_p99_ms": latency["p99"] / 1000.0,
        "latency_max_ms": latency["max"] / 1000.0,
        "lost": check["lost"],
        "loadgen_cpu_pct": measured["loadgen_cpu_pct"],
    }
    problems = _check_problems(check, allow_loss=False)
    if not check["complete"] and not problems:
        problems.append("delivery check incomplete")
    warnings = _loadgen_warnings(measured["loadgen_cpu_pct"])
    if (
        not shared_core
        and figures["server_core_busy_pct"] is not None
        and figures["server_cpu_pct"] is not None
        and figures["server_core_busy_pct"] - figures["server_cpu_pct"] > OTHER_LOAD_LIMIT
    ):
        warnings.append(
            "the server's CPU was {:.0f}% busy but the server used {:.0f}%: something"
            " else ran there and may have disturbed this run".format(
                figures["server_core_busy_pct"], figures["server_cpu_pct"]
            )
        )
    if (figures["server_core_steal_pct"] or 0) > 5:
        warnings.append(
            "{:.0f}% of the server's CPU was stolen by the hypervisor: figures are"
            " unreliable".format(figures["server_core_steal_pct"])
        )
    warnings += _stop_warnings(stopped, s.stop_grace)
    return {
        "figures": figures,
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "loadgen": result,
        "loadgen_status": loadgen_status,
        "server_process": {
            "pid": server.pid,
            "port": server.port,
            "startup_s": round(startup, 3),
            "rss_start_kib": rss_start,
            "rss_end_kib": rss_end,
            "stop": stopped,
        },
    }


class Throughput(Scenario):
    id = "S1"
    title = "throughput: one publisher, {window} messages of {size} bytes in flight"
    metrics = [
        Metric("deliveries_per_s", "deliveries/s", "higher", 0),
        Metric("cpu_us_per_delivery", "server process CPU µs/delivery", "lower", 2),
        Metric("latency_p99_ms", "p99 latency ms (saturated)", "lower", 1),
        Metric("server_cpu_pct", "server process CPU %", None, 0),
        Metric("server_core_busy_pct", "server core busy %", None, 0),
        Metric("loadgen_cpu_pct", "load generator CPU %", None, 0),
    ]

    def variants(self, settings: Settings) -> List[Variant]:
        return [
            Variant("S1/{}".format(n), "{} subscribers".format(n), {"subscribers": n})
            for n in settings.s1_subscribers
        ]

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        return _message_run(
            ctx, spec, variant, repetition, "throughput",
            subscribers=variant.params["subscribers"], window=ctx.settings.window,
        )


class Latency(Scenario):
    id = "S2"
    title = "latency at an offered rate, {size}-byte messages"
    metrics = [
        Metric("latency_p50_ms", "p50 latency ms", "lower", 2),
        Metric("latency_p99_ms", "p99 latency ms", "lower", 2),
        Metric("latency_max_ms", "max latency ms", "lower", 1),
        Metric("lost", "deliveries lost", "lower", 0),
        Metric("cpu_us_per_delivery", "server process CPU µs/delivery", "lower", 2),
        Metric("server_core_busy_pct", "server core busy %", None, 0),
        Metric("loadgen_cpu_pct", "load generator CPU %", None, 0),
    ]

    def variants(self, settings: Settings) -> List[Variant]:
        n = settings.s2_subscribers
        return [
            Variant(
                "S2/{:g}".format(rate),
                "{} subscribers, {:g} msg/s".format(n, rate),
                {"subscribers": n, "rate": rate},
            )
            for rate in settings.s2_rates
        ]

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        return _message_run(
            ctx, spec, variant, repetition, "rate",
            subscribers=variant.params["subscribers"], rate=variant.params["rate"],
        )


class IdleMemory(Scenario):
    id = "S3"
    title = "idle connections: memory and connection cost"
    metrics = [
        Metric("rss_kib_per_conn", "RSS KiB/connection", "lower", 1),
        Metric("connections_per_s", "connections/s (opening)", "higher", 0),
        Metric("server_cpu_ms_per_conn", "server CPU ms/connection (opening)", "lower", 3),
        Metric("rss_mib", "RSS MiB (all open)", "lower", 1),
    ]

    def variants(self, settings: Settings) -> List[Variant]:
        variants = []
        for asked in settings.s3_connections:
            n = min(asked, settings.max_connections)
            label = "{} idle connections".format(n)
            if n < asked:
                label += " ({} asked; open files limit {})".format(asked, settings.nofile_limit)
            variants.append(Variant("S3/{}".format(asked), label, {"connections": n, "asked": asked}))
        return variants

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        s = ctx.settings
        n = variant.params["connections"]
        first = max(1, n // 10)
        connect_timeout = 120 + 3 * (n / 1000.0) ** 2
        server_log, loadgen_log = ctx.logs(spec, variant, repetition)
        with ServerProcess(spec, ctx.server_cpu, server_log) as server:
            startup = server.wait_ready()
            rss_start = server.rss_kib()
            args = loadgen_args(
                port=server.port,
                mode="idle",
                stages=[first, n],
                server_pid=server.pid,
                sources=1 + n // 10000,
                concurrency=32,
                # broadcaster announces every connection to every client:
                # opening N costs it O(N²), minutes for 20,000.
                connect_timeout=connect_timeout,
                linger_max=s.stop_grace + 30,
            )
            deadline = connect_timeout + 60
            with LoadGen(ctx.loadgen, args, ctx.loadgen_cpu, loadgen_log) as lg:
                stage_a = lg.read_result(timeout=deadline)
                time.sleep(s.settle)
                rss_a = server.rss_kib()
                lg.next_stage()
                stage_b = lg.read_result(timeout=deadline)
                time.sleep(s.settle)
                rss_b = server.rss_kib()
                stopped = server.stop(s.stop_grace)
            loadgen_status = lg.proc.returncode
        added = n - first
        figures = {
            "rss_kib_per_conn": (rss_b - rss_a) / added if added else None,
            "rss_mib": rss_b / 1024.0,
            "connections_per_s": added / stage_b["connect_seconds"]
            if stage_b["connect_seconds"] > 0
            else None,
            "server_cpu_ms_per_conn": 1000.0 * stage_b["server_cpu_s"] / added
            if added and stage_b["server_cpu_s"] >= 0
            else None,
            "loadgen_cpu_pct": None,
        }
        problems = []
        for stage in (stage_a, stage_b):
            if stage["open"] != stage["connections"]:
                problems.append(
                    "{} of {} connections open".format(stage["open"], stage["connections"])
                )
            problems += _connection_problems(stage)
        return {
            "figures": figures,
            "ok": not problems,
            "problems": problems,
            "warnings": _stop_warnings(stopped, s.stop_grace),
            "loadgen": {"stages": [stage_a, stage_b]},
            "loadgen_status": loadgen_status,
            "server_process": {
                "pid": server.pid,
                "port": server.port,
                "startup_s": round(startup, 3),
                "rss_start_kib": rss_start,
                "rss_stage_kib": [rss_a, rss_b],
                "stop": stopped,
            },
        }

    def headline(self, figures: Dict[str, float]) -> str:
        return "{} KiB/connection, {} connections/s".format(
            _fmt(figures.get("rss_kib_per_conn"), 1), _fmt(figures.get("connections_per_s"), 0)
        )


class NeedsServerOption(Scenario):
    """
    A scenario of broadcaster only, needing one of its options (and
    ``redis-server``): not applicable to the reference servers, not
    available while broadcaster lacks :attr:`option` or there is no
    ``redis-server``.
    """

    option = ""

    def unavailable(self, spec: ServerSpec) -> Optional[str]:
        if spec.name not in ("broadcaster", "baseline"):
            return "not applicable: only broadcaster has {}".format(self.option)
        if self.option not in spec.options():
            return "not available: broadcaster has no {} option".format(self.option)
        if redis_server_path() is None:
            return "not available: needs redis-server (apt-get install redis-server)"
        return None

    def notes(self, ctx: Context) -> List[str]:
        """Where this scenario's processes ran, for the results' notes."""
        return []


@contextmanager
def _two_nodes(ctx: Context, spec: ServerSpec, server_log: Path, other_log: str):
    """
    A redis-server and two broadcaster nodes on it, all on the server CPU,
    registered with each other.  Node B logs to ``server_log``, node A to
    the file named after it with ``other_log`` for ``-server.log``.

    :return: a context manager giving ``(redis, node_a, node_b, startup)``.
    """
    redis_log = server_log.with_name(server_log.name.replace("-server.log", "-redis.log"))
    node_a_log = server_log.with_name(server_log.name.replace("-server.log", other_log))
    with RedisProcess(ctx.server_cpu, redis_log) as redis:
        redis.wait_ready()

        def node(name: str) -> ServerSpec:
            return with_args(
                spec, ["--redis", redis.url, "--node-id", name],
                label="{} node {}".format(spec.label, name),
            )

        with ServerProcess(node("a"), ctx.server_cpu, node_a_log) as node_a, \
                ServerProcess(node("b"), ctx.server_cpu, server_log) as node_b:
            t0 = time.monotonic()
            node_a.wait_ready()
            node_b.wait_ready()
            wait_backplane(node_a, nodes=2)
            wait_backplane(node_b, nodes=2)
            yield redis, node_a, node_b, time.monotonic() - t0


#: S1's figures that S4 and S5 report.
_FAN_OUT_METRICS = [
    Metric("deliveries_per_s", "deliveries/s", "higher", 0),
    Metric("latency_p99_ms", "p99 latency ms (saturated)", "lower", 1),
    Metric("latency_p50_ms", "p50 latency ms (saturated)", "lower", 1),
]


class CrossNode(NeedsServerOption):
    """
    S4: a redis-server and two broadcaster nodes on it, all three on the
    server CPU; the publisher on node A, every subscriber on node B.
    """

    id = "S4"
    title = "cross-node fan-out via Redis (publisher on node A, subscribers on node B)"
    option = "--redis"
    metrics = _FAN_OUT_METRICS + [
        Metric("core_us_per_delivery", "server core µs/delivery (A + B + Redis)", "lower", 2),
        Metric("cpu_us_per_delivery", "node B process CPU µs/delivery", "lower", 2),
        Metric("server_core_busy_pct", "server core busy %", None, 0),
        Metric("loadgen_cpu_pct", "load generator CPU %", None, 0),
    ]

    def variants(self, settings: Settings) -> List[Variant]:
        n = settings.s45_subscribers
        return [Variant("S4/{}".format(n), "{} subscribers".format(n), {"subscribers": n})]

    def notes(self, ctx: Context) -> List[str]:
        return [
            "S4: redis-server and both broadcaster nodes on CPU {} (the one core S1's single"
            " node has), the load generator on CPU {}: the cross-node figure is what the same"
            " core does with the Redis hop added, comparable with S1".format(
                ctx.server_cpu, ctx.loadgen_cpu
            )
        ]

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        s = ctx.settings
        server_log, loadgen_log = ctx.logs(spec, variant, repetition)
        with _two_nodes(ctx, spec, server_log, "-node-a.log") as (redis, node_a, node_b, startup):

            def stop() -> Dict:
                # B holds the subscribers: it drains while they are open.
                stopped = node_b.stop(s.stop_grace)
                stopped_a = node_a.stop(s.stop_grace)
                return dict(
                    stopped, node_a=stopped_a, killed=stopped["killed"] or stopped_a["killed"]
                )

            record = _drive(
                ctx, node_b, startup, loadgen_log, "throughput",
                subscribers=variant.params["subscribers"], window=s.window,
                publisher_port=node_a.port, stop=stop, shared_core=True,
            )
            record["redis_status"] = redis.stop()
        record["server_process"]["node_a"] = {"pid": node_a.pid, "port": node_a.port}
        record["server_process"]["redis"] = {"pid": redis.pid, "port": redis.port}
        record["placement"] = {
            "redis": ctx.server_cpu, "node_a": ctx.server_cpu, "node_b": ctx.server_cpu,
            "loadgen": ctx.loadgen_cpu,
        }
        return record


class Workers(NeedsServerOption):
    """
    S5: S1 at 1000 subscribers on broadcaster as one process and with
    ``--workers 2`` (and its private redis-server), the server unpinned.
    """

    id = "S5"
    title = "S1 throughput, one process vs --workers 2 (server unpinned)"
    option = "--workers"
    metrics = _FAN_OUT_METRICS + [
        Metric("loadgen_cpu_pct", "load generator CPU %", None, 0),
    ]

    def variants(self, settings: Settings) -> List[Variant]:
        n = settings.s45_subscribers
        return [
            Variant(
                "S5/{}/w{}".format(n, workers),
                "{} subscribers, {}".format(
                    n, "one process" if workers == 1 else "--workers {}".format(workers)
                ),
                {"subscribers": n, "workers": workers},
            )
            for workers in (1, 2)
        ]

    def notes(self, ctx: Context) -> List[str]:
        cores = len(os.sched_getaffinity(0))
        notes = [
            "S5: the server (master, workers and their private redis-server) is not pinned:"
            " the workers need every core; the load generator stays on CPU {}, so on this"
            " machine ({} usable CPUs) the workers share its core".format(ctx.loadgen_cpu, cores)
        ]
        if cores < 4:
            notes.append(
                "S5: the issue's target (--workers 2 at least 1.7x one process) applies with"
                " 4 or more cores; with {} the load generator, Redis and two workers compete"
                " for them, so the ratio here is not a test of it".format(cores)
            )
        return notes

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        s = ctx.settings
        workers = variant.params["workers"]
        server_log, loadgen_log = ctx.logs(spec, variant, repetition)
        if workers > 1:
            spec = with_args(
                spec, ["--workers", str(workers), "--node-id", "bench"],
                label="{} --workers {}".format(spec.label, workers),
            )
        with ServerProcess(spec, None, server_log) as server:
            t0 = time.monotonic()
            server.wait_ready()
            if workers > 1:
                # The master listens before its workers run: wait until
                # /healthz has been answered by every worker.
                seen = wait_backplane(server, nodes=workers, distinct=workers)
            startup = time.monotonic() - t0
            pids = descendants(server.pid)
            record = _drive(
                ctx, server, startup, loadgen_log, "throughput",
                subscribers=variant.params["subscribers"], window=s.window, server_core=None,
            )
        if workers > 1:
            # The generator measured the master's CPU only: drop the
            # process figures rather than show a master that does nothing.
            for key in ("cpu_us_per_delivery", "server_cpu_pct", "server_kernel_pct"):
                record["figures"][key] = None
            record["server_process"]["workers"] = sorted(seen)
        record["server_process"]["descendants"] = pids
        left = [pid for pid in pids if _running(pid)]
        if left:
            record["problems"].append("processes left running after the stop: {}".format(left))
            record["ok"] = False
        record["placement"] = {"server": None, "loadgen": ctx.loadgen_cpu}
        return record


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class BigRoom(Scenario):
    """
    S6: a lobby of thousands, and one JSON client joining and listing it.
    """

    id = "S6"
    title = "a big room: joining it and listing its members"
    metrics = [
        Metric("welcome_ms", "welcome ms (connect to welcome)", "lower", 1),
        Metric("welcome_kib", "welcome KiB", "lower", 1),
        Metric("list_ms", "ms to list every member (who)", "lower", 0),
        Metric("list_kib", "KiB to list every member (who)", "lower", 0),
        Metric("rss_mib", "RSS MiB (all in)", "lower", 1),
    ]

    def variants(self, settings: Settings) -> List[Variant]:
        variants = []
        for asked in settings.s6_members:
            # The JSON client and the server's own descriptors need room too.
            n = min(asked, settings.max_connections - 1)
            variants.append(
                Variant("S6/{}".format(asked), "{} members".format(n), {"members": n})
            )
        return variants

    def unavailable(self, spec: ServerSpec) -> Optional[str]:
        if spec.name != "broadcaster":
            return "not applicable: only broadcaster has rooms and who"
        return None

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        from bench.wsclient import JSONClient, WSError

        s = ctx.settings
        n = variant.params["members"]
        connect_timeout = 120 + 3 * (n / 1000.0) ** 2
        server_log, loadgen_log = ctx.logs(spec, variant, repetition)
        problems: List[str] = []
        figures: Dict[str, Optional[float]] = {"loadgen_cpu_pct": None}
        with ServerProcess(spec, ctx.server_cpu, server_log) as server:
            startup = server.wait_ready()
            args = loadgen_args(
                port=server.port,
                mode="idle",
                stages=[n],
                server_pid=server.pid,
                sources=1 + n // 10000,
                concurrency=32,
                connect_timeout=connect_timeout,
                linger_max=s.stop_grace + 30,
                name_length=32,
            )
            with LoadGen(ctx.loadgen, args, ctx.loadgen_cpu, loadgen_log) as lg:
                stage = lg.read_result(timeout=connect_timeout + 60)
                if stage["open"] != n:
                    problems.append("{} of {} members connected".format(stage["open"], n))
                time.sleep(s.settle)
                figures["rss_mib"] = server.rss_kib() / 1024.0
                deadline = time.monotonic() + 120
                try:
                    started = time.monotonic()
                    client = JSONClient(server.port)
                    welcome, size = client.receive_type("welcome", deadline)
                    figures["welcome_ms"] = 1000 * (time.monotonic() - started)
                    figures["welcome_kib"] = size / 1024.0
                    listed = {m["id"] for m in welcome["members"]}
                    cursor = welcome.get("next")
                    before = client.received
                    started = time.monotonic()
                    while cursor is not None:
                        client.send({"type": "who", "cursor": cursor})
                        page, _ = client.receive_type("presence", deadline)
                        listed.update(m["id"] for m in page["members"])
                        cursor = page["next"]
                    figures["list_ms"] = 1000 * (time.monotonic() - started)
                    figures["list_kib"] = (client.received - before) / 1024.0
                    client.close()
                    if welcome.get("count") != n + 1 or len(listed) != n + 1:
                        problems.append(
                            "count {}, listed {}, expected {}".format(
                                welcome.get("count"), len(listed), n + 1
                            )
                        )
                except (OSError, WSError, KeyError, ValueError) as e:
                    problems.append("the JSON client failed: {}".format(e))
                stopped = server.stop(s.stop_grace)
            loadgen_status = lg.proc.returncode
        return {
            "figures": figures,
            "ok": not problems,
            "problems": problems,
            "warnings": [],
            "loadgen": {"stages": [stage]},
            "loadgen_status": loadgen_status,
            "server_process": {
                "pid": server.pid,
                "port": server.port,
                "startup_s": round(startup, 3),
                "stop": stopped,
            },
        }

    def headline(self, figures: Dict[str, float]) -> str:
        return "welcome in {} ms ({} KiB), every member listed in {} ms".format(
            _fmt(figures.get("welcome_ms"), 1),
            _fmt(figures.get("welcome_kib"), 1),
            _fmt(figures.get("list_ms"), 0),
        )


class RoomLocality(NeedsServerOption):
    """
    S7: two nodes, 100 rooms, each node with the members of half of them;
    messages in node A's rooms only.  What each process spends per message.
    """

    id = "S7"
    title = "per-room delivery: node B has none of the busy rooms' members"
    # Not --room-grace: a baseline from before per-room channels runs it
    # too, and shows what node B paid when every node received every room.
    option = "--redis"
    metrics = [
        Metric("b_pct_of_a", "node B CPU as % of node A's", "lower", 2),
        Metric("a_us_per_message", "node A CPU µs per published message", "lower", 1),
        Metric("b_us_per_message", "node B CPU µs per published message", "lower", 2),
        Metric("redis_us_per_message", "Redis CPU µs per published message", "lower", 1),
        Metric("messages_per_s", "messages published per s", None, 0),
    ]

    #: Rooms, members of each room on its node, and the publishing rate.
    ROOMS = 100
    MEMBERS = 5
    RATE = 500.0

    def variants(self, settings: Settings) -> List[Variant]:
        count = settings.messages or int(self.RATE * settings.duration)
        return [Variant("S7", "{} rooms, {} messages".format(self.ROOMS, count), {"messages": count})]

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        import threading

        from bench.wsclient import JSONClient, WSError

        s = ctx.settings
        count = variant.params["messages"]
        server_log, _ = ctx.logs(spec, variant, repetition)
        busy = ["room-{}".format(i) for i in range(self.ROOMS // 2)]
        quiet = ["room-{}".format(i) for i in range(self.ROOMS // 2, self.ROOMS)]
        problems: List[str] = []
        figures: Dict[str, Optional[float]] = {}
        received: Dict[int, int] = {}
        with _two_nodes(ctx, spec, server_log, "-node-a.log") as (redis, node_a, node_b, _):
            deadline = time.monotonic() + 120
            clients = []
            try:
                for port, rooms in [(node_a.port, busy)] * self.MEMBERS + [
                    (node_b.port, quiet)
                ] * self.MEMBERS:
                    client = JSONClient(port)
                    client.receive_type("welcome", deadline)
                    for room in rooms:
                        client.send({"type": "join", "room": room})
                        client.receive_type("presence", deadline)
                    clients.append(client)
                # The publisher is one more member of the busy rooms.
                publisher = JSONClient(node_a.port)
                publisher.receive_type("welcome", deadline)
                for room in busy:
                    publisher.send({"type": "join", "room": room})
                    publisher.receive_type("presence", deadline)
            except (OSError, WSError) as e:
                problems.append("a client failed to join: {}".format(e))
                return {"figures": figures, "ok": False, "problems": problems, "warnings": []}

            def drain(index: int, client) -> None:
                # Every client reads what it is sent, as a real one would.
                try:
                    while True:
                        event, _ = client.receive()
                        if event.get("type") == "message":
                            received[index] = received.get(index, 0) + 1
                except (OSError, WSError, ValueError):
                    pass

            readers = [
                threading.Thread(target=drain, args=(i, c), daemon=True)
                for i, c in enumerate(clients + [publisher])
            ]
            for reader in readers:
                reader.start()
            time.sleep(s.settle)
            pids = {"a": node_a.pid, "b": node_b.pid, "redis": redis.pid}
            before = {name: read_cpu_seconds(pid) for name, pid in pids.items()}
            started = time.monotonic()
            for i in range(count):
                publisher.send(
                    {"type": "message", "room": busy[i % len(busy)], "text": "m{}".format(i)}
                )
                lag = started + (i + 1) / self.RATE - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            expected = count * self.MEMBERS
            wait_until = time.monotonic() + s.drain_max
            members = range(len(clients))
            while time.monotonic() < wait_until and sum(
                received.get(i, 0) for i in members
            ) < expected:
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            after = {name: read_cpu_seconds(pid) for name, pid in pids.items()}
            for client in clients + [publisher]:
                client.close()
            node_b.stop(s.stop_grace)
            node_a.stop(s.stop_grace)
            redis.stop()
        got = sum(received.get(i, 0) for i in range(len(clients)))
        if got != expected:
            problems.append("{} of {} deliveries arrived".format(got, expected))
        spent = {name: after[name] - before[name] for name in pids}
        figures["a_us_per_message"] = 1e6 * spent["a"] / count
        figures["b_us_per_message"] = 1e6 * spent["b"] / count
        figures["redis_us_per_message"] = 1e6 * spent["redis"] / count
        figures["b_pct_of_a"] = 100.0 * spent["b"] / spent["a"] if spent["a"] else None
        figures["messages_per_s"] = count / elapsed
        return {
            "figures": figures,
            "ok": not problems,
            "problems": problems,
            "warnings": [],
            "cpu_seconds": spent,
            "server_process": {"pid": pids["a"], "node_b": pids["b"], "redis": pids["redis"]},
        }

    def headline(self, figures: Dict[str, float]) -> str:
        return "node B spent {}% of node A's CPU; Redis {} µs per message".format(
            _fmt(figures.get("b_pct_of_a"), 2), _fmt(figures.get("redis_us_per_message"), 1)
        )


def _listen_drops() -> Optional[int]:
    """
    The kernel's count of connection attempts dropped at a full listen
    queue (``TcpExt ListenDrops`` in ``/proc/net/netstat``; for the whole
    machine), or ``None`` where it cannot be read.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            if "ListenDrops" in table:
                return int(table["ListenDrops"])
    return None


class ConnectionStorm(Scenario):
    """
    S8: N connections opened as fast as the server takes them.
    """

    id = "S8"
    title = "connection storm: every connection opened at once"
    metrics = [
        Metric("storm_s", "seconds until all connected (and greeted)", "lower", 2),
        Metric("connections_per_s", "connections/s", "higher", 0),
        Metric("cpu_ms_per_conn", "server CPU ms/connection", "lower", 3),
        Metric("handshake_p99_ms", "p99 handshake ms (connect() to 101)", "lower", 1),
        Metric("frames_per_conn", "frames received per connection", None, 0),
        Metric("loadgen_cpu_pct", "load generator CPU %", None, 0),
    ]
    chart = ["storm_s", "cpu_ms_per_conn"]

    def variants(self, settings: Settings) -> List[Variant]:
        variants = []
        for asked in settings.storm_connections:
            n = min(asked, settings.max_connections)
            label = "{} connections".format(n)
            if n < asked:
                label += " ({} asked; open files limit {})".format(asked, settings.nofile_limit)
            variants.append(Variant("S8/{}".format(asked), label, {"connections": n}))
        return variants

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        s = ctx.settings
        n = variant.params["connections"]
        # broadcaster announces every arrival to everyone: N²/2 frames.
        connect_timeout = 120 + 3 * (n / 1000.0) ** 2
        server_log, loadgen_log = ctx.logs(spec, variant, repetition)
        with ServerProcess(spec, ctx.server_cpu, server_log) as server:
            startup = server.wait_ready()
            drops = _listen_drops()
            args = loadgen_args(
                port=server.port,
                mode="storm",
                subscribers=n,
                concurrency=s.storm_concurrency,
                greeting=1 if spec.greets else 0,
                server_pid=server.pid,
                sources=1 + n // 10000,
                connect_timeout=connect_timeout,
                settle_max=60,
                linger_max=s.stop_grace + 30,
            )
            with LoadGen(ctx.loadgen, args, ctx.loadgen_cpu, loadgen_log) as lg:
                result = lg.read_result(timeout=connect_timeout + 120)
                rss = server.rss_kib()
                stopped = server.stop(s.stop_grace)
            loadgen_status = lg.proc.returncode
        if drops is not None:
            after = _listen_drops()
            drops = None if after is None else after - drops
        storm = result["storm_seconds"] if result["complete"] else None
        figures = {
            "storm_s": storm,
            "connections_per_s": n / storm if storm else None,
            "cpu_ms_per_conn": 1000.0 * result["server_cpu_s"] / n
            if result["server_cpu_s"] >= 0
            else None,
            "handshake_p99_ms": result["handshake_ms"]["p99"] if result["opened"] else None,
            "frames_per_conn": result["announcements"] / n,
            "loadgen_cpu_pct": 100.0 * result["loadgen_cpu_s"] / result["quiet_seconds"]
            if result["quiet_seconds"] > 0
            else None,
        }
        problems = []
        if not result["complete"]:
            problems.append(
                "{} of {} connections open{} within {:.0f} s".format(
                    result["opened"], n,
                    ", {} greeted".format(result["greeted"]) if spec.greets else "",
                    connect_timeout,
                )
            )
        # Everyone hears of every later arrival, its own included (and of
        # those announced in the same batch as its own): at least N(N+1)/2.
        least = n * (n + 1) // 2
        if spec.greets and result["announcements"] < least:
            problems.append(
                "{:,} announcements received, at least {:,} expected".format(
                    result["announcements"], least
                )
            )
        problems += _connection_problems(result)
        warnings = _loadgen_warnings(figures["loadgen_cpu_pct"]) + _stop_warnings(
            stopped, s.stop_grace
        )
        if drops:
            warnings.append(
                "the kernel dropped {} connection attempts at a full listen queue during the"
                " run (ListenDrops, machine-wide): those clients retried a second or more"
                " later".format(drops)
            )
        return {
            "figures": figures,
            "ok": not problems,
            "problems": problems,
            "warnings": warnings,
            "loadgen": result,
            "loadgen_status": loadgen_status,
            "listen_drops": drops,
            "server_process": {
                "pid": server.pid,
                "port": server.port,
                "startup_s": round(startup, 3),
                "rss_kib": rss,
                "stop": stopped,
            },
        }

    def headline(self, figures: Dict[str, float]) -> str:
        return "all in {} s ({} connections/s), {} ms server CPU each".format(
            _fmt(figures.get("storm_s"), 2), _fmt(figures.get("connections_per_s"), 0),
            _fmt(figures.get("cpu_ms_per_conn"), 3),
        )


def _buffer_flags(limit: int) -> List[str]:
    """
    broadcaster's flags for a ``--max-buffer`` of ``limit`` bytes, with the
    limits it must not be below lowered to fit (never raised).
    """
    flags = ["--max-buffer", str(limit)]
    if limit < 16 * 1024 * 1024:
        flags += ["--max-image-size", str(limit)]
    if limit < 65536:
        flags += ["--max-message-size", str(limit)]
    return flags


def _frame_size(size: int) -> int:
    """The bytes of a server frame (unmasked) carrying ``size`` bytes."""
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


class SlowConsumers(Scenario):
    """
    S9: S2 with ten slow subscribers and one that stops reading, beside the
    same run with every subscriber reading.
    """

    id = "S9"
    title = "slow consumers: the others' latency, and the stalled one cut"
    metrics = [
        Metric("latency_p50_ms", "p50 latency ms (the others)", "lower", 2),
        Metric("latency_p99_ms", "p99 latency ms (the others)", "lower", 2),
        Metric("latency_max_ms", "max latency ms (the others)", "lower", 1),
        Metric("lost", "deliveries lost (the others)", "lower", 0),
        Metric("stalled_cut", "stalled subscriber cut by the server (1 yes, 0 no)", None, 0),
        Metric("stalled_received", "messages the stalled one received", None, 0),
        Metric("slow_cut", "slow subscribers cut", None, 0),
        Metric("cpu_us_per_delivery", "server process CPU µs/delivery", "lower", 2),
        Metric("loadgen_cpu_pct", "load generator CPU %", None, 0),
    ]
    chart = ["latency_p50_ms", "latency_p99_ms"]

    def variants(self, settings: Settings) -> List[Variant]:
        n, rate = settings.s2_subscribers, settings.s9_rate
        slow = min(settings.s9_slow, max(0, n - settings.s9_stalled - 1))
        stalled = min(settings.s9_stalled, n - slow - 1)
        return [
            Variant(
                "S9/baseline",
                "{} subscribers, {:g} msg/s, all reading".format(n, rate),
                {"subscribers": n, "slow": 0, "stalled": 0},
            ),
            Variant(
                "S9/slow",
                "{} subscribers, {:g} msg/s, {} slow, {} stalled".format(n, rate, slow, stalled),
                {"subscribers": n, "slow": slow, "stalled": stalled},
            ),
        ]

    def notes(self, ctx: Context) -> List[str]:
        s = ctx.settings
        return [
            "S9: broadcaster runs with {} (lowered, not off: its default --max-buffer is"
            " 16 MiB) so that the stalled subscriber passes the limit within the run; the"
            " reference servers have no such limit and run as they are".format(
                " ".join(_buffer_flags(s.s9_max_buffer))
            )
        ]

    def run(self, ctx: Context, spec: ServerSpec, variant: Variant, repetition: int) -> Dict:
        s = ctx.settings
        slow, stalled = variant.params["slow"], variant.params["stalled"]
        limited = "--max-buffer" in spec.options()
        if limited:
            spec = with_args(spec, _buffer_flags(s.s9_max_buffer))
        extra: Dict[str, Any] = {}
        if slow or stalled:
            extra = {
                "slow": slow,
                "stalled": stalled,
                "slow_bytes_per_s": round(s.s9_slow_share * s.s9_rate * _frame_size(s.s9_size)),
            }
        record = _message_run(
            ctx, spec, variant, repetition, "rate",
            subscribers=variant.params["subscribers"], rate=s.s9_rate, size=s.s9_size,
            extra=extra,
        )
        result = record["loadgen"]
        record["max_buffer"] = s.s9_max_buffer if limited else None
        if stalled:
            cut = result["stalled"]
            record["figures"].update(
                stalled_cut=1.0 if cut["cut"] == cut["count"] else 0.0,
                stalled_received=cut["received"],
                slow_cut=result["slow"]["cut"],
            )
            if limited and cut["cut"] < cut["count"]:
                record["problems"].append(
                    "the stalled subscriber was not cut (it got {} of {} messages; --max-buffer"
                    " {})".format(cut["received"], result["sent"], s.s9_max_buffer)
                )
                record["ok"] = False
        return record

    def headline(self, figures: Dict[str, float]) -> str:
        line = "p50 {} ms, p99 {} ms".format(
            _fmt(figures.get("latency_p50_ms"), 2), _fmt(figures.get("latency_p99_ms"), 2)
        )
        if figures.get("stalled_cut") is not None:
            line += ", stalled subscriber {}".format("cut" if figures["stalled_cut"] else "not cut")
        return line


SCENARIOS: Dict[str, Scenario] = {
    s.id: s
    for s in (
        Throughput(), Latency(), IdleMemory(), CrossNode(), Workers(), BigRoom(), RoomLocality(),
        ConnectionStorm(), SlowConsumers(),
    )
}
