"""
``python -m bench``: options, the order of the runs, and the results.

Runs are interleaved: each repetition goes through every scenario variant,
and within a variant through every server, starting with a different server
each repetition, so that slow drifts of the machine spread over all servers
alike.  Every run starts a fresh server process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bench import machine, report
from bench.floor import describe_floor, send_floor
from bench.loadgen import BuildError, LoadGenError, build
from bench.scenarios import SCENARIOS, Context, Settings
from bench.servers import BENCH_DIR, REFERENCE, SERVERS, ServerError, add_baseline, lookup

DEFAULT_JSON = BENCH_DIR / "results" / "latest.json"


def _ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers, not {!r}".format(text))
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive numbers, not {!r}".format(text))
    return values


def _floats(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated numbers, not {!r}".format(text))
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("expected positive numbers, not {!r}".format(text))
    return values


def _names(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "broadcaster's fan-out benchmark: runs broadcaster and the reference"
            " servers (Autobahn, websockets, picows) in turn, pinned to one CPU, against a"
            " C load generator pinned to another, and reports medians and the"
            " ratio to the Autobahn reference.  See bench/README.rst."
        ),
    )
    p.add_argument(
        "--servers", type=_names, default=None,
        help="comma-separated subset of: {} (default: all; one whose Python"
        " package is missing is skipped with a note)".format(", ".join(SERVERS)),
    )
    p.add_argument(
        "--scenarios", type=_names, default=None,
        help="comma-separated subset of: {} (default: all)".format(", ".join(SCENARIOS)),
    )
    p.add_argument("--repeat", type=int, default=None, help="repetitions of every run (default 3; 1 with --quick)")
    p.add_argument(
        "--quick", action="store_true",
        help="a tiny run for the test suite: 20 subscribers, 200 messages, 200 idle"
        " connections, a storm of 200",
    )
    p.add_argument(
        "--json-out", type=Path, default=DEFAULT_JSON,
        help="results file (default bench/results/latest.json)",
    )
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds of S1 and S2 runs (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before them (default 1)")
    p.add_argument("--window", type=int, default=32, help="S1: messages in flight (default 32)")
    p.add_argument("--size", type=int, default=64, help="message size in bytes, 33 to 65536 (default 64)")
    p.add_argument("--s1-subscribers", type=_ints, default=[100, 1000], help="S1 variants (default 100,1000)")
    p.add_argument("--s2-subscribers", type=int, default=1000, help="S2 subscribers (default 1000)")
    p.add_argument("--s2-rates", type=_floats, default=[200.0, 20.0], help="S2 offered messages/s (default 200,20)")
    p.add_argument(
        "--s45-subscribers", type=int, default=1000,
        help="subscribers of S4 (cross-node) and S5 (workers) (default 1000)",
    )
    p.add_argument(
        "--big-room-members", type=_ints, default=[20000],
        help="S6 variants: idle members in the lobby (default 20000)",
    )
    p.add_argument(
        "--idle-connections", type=_ints, default=[5000],
        help="S3 variants (default 5000; e.g. 5000,20000: counts above the open files"
        " limit are lowered to fit)",
    )
    p.add_argument(
        "--storm-connections", type=_ints, default=[5000, 20000],
        help="S8 variants: connections opened at once (default 5000,20000; lowered to fit"
        " the open files limit)",
    )
    p.add_argument(
        "--storm-concurrency", type=int, default=256,
        help="S8: connects and handshakes under way at a time (default 256)",
    )
    p.add_argument("--s9-rate", type=float, default=20.0, help="S9 messages/s (default 20)")
    p.add_argument(
        "--s9-size", type=int, default=4096,
        help="S9 message size in bytes, 33 to 65526 (default 4096)",
    )
    p.add_argument(
        "--s9-max-buffer", type=int, default=65536,
        help="S9: broadcaster's --max-buffer, so that the stalled subscriber is cut within"
        " the run (default 65536; at least the message size plus its frame header)",
    )
    p.add_argument(
        "--baseline", default=None, metavar="REV",
        help="also run broadcaster as of this git revision (as broadcaster@REV), to"
        " compare a change before and after in one run",
    )
    p.add_argument("--server-cpu", type=int, default=None, help="CPU for the servers (default: the first usable)")
    p.add_argument("--loadgen-cpu", type=int, default=None, help="CPU for the load generator (default: the second usable)")
    p.add_argument(
        "--stop-grace", type=float, default=15.0,
        help="seconds a server has to exit after SIGTERM before SIGKILL (default 15)",
    )
    p.add_argument("--log-dir", type=Path, default=None, help="keep server and load generator logs here")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the load generator is built (default ~/.cache/broadcaster-bench)")
    return p


def _cpus(args) -> tuple:
    """(server CPU, load generator CPU, note): two distinct usable CPUs if possible."""
    usable = sorted(os.sched_getaffinity(0))
    server, loadgen = args.server_cpu, args.loadgen_cpu
    for cpu in (server, loadgen):
        if cpu is not None and cpu not in usable:
            raise SystemExit("python -m bench: CPU {} is not usable here (usable: {})".format(cpu, usable))
    if len(usable) < 2 and (server is None or loadgen is None):
        return None, None, "only one usable CPU: nothing pinned; the figures are not comparable"
    if server is None:
        server = next(c for c in usable if c != loadgen)
    if loadgen is None:
        loadgen = next(c for c in usable if c != server)
    note = None if server != loadgen else "server and load generator share CPU {}".format(server)
    return server, loadgen, note


def _raise_nofile() -> int:
    """Raise our open files limit to the hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1 or args.window < 1 or not 33 <= args.size <= 65536:
        parser().error("--repeat and --window must be at least 1, --size 33 to 65536")
    if args.storm_concurrency < 1 or args.s9_rate <= 0 or not 33 <= args.s9_size <= 65526:
        parser().error(
            "--storm-concurrency must be at least 1, --s9-rate above 0, --s9-size 33 to 65526"
        )
    if args.s9_max_buffer < args.s9_size + 10:
        parser().error("--s9-max-buffer must hold one message: at least --s9-size + 10")

    try:
        servers = [lookup(name).name for name in (args.servers or list(SERVERS))]
    except KeyError as e:
        parser().error("unknown server {} (known: {})".format(e, ", ".join(SERVERS)))
    try:
        scenarios = [SCENARIOS[name.upper()] for name in (args.scenarios or list(SCENARIOS))]
    except KeyError as e:
        parser().error("unknown scenario {} (known: {})".format(e, ", ".join(SCENARIOS)))

    if args.baseline is not None:
        try:
            baseline = add_baseline(args.baseline)
        except ServerError as e:
            _log("python -m bench: {}".format(e))
            return 2
        servers.insert(servers.index("broadcaster") + 1 if "broadcaster" in servers else 0,
                       baseline.name)
    notes: List[str] = []
    runnable = []
    for name in servers:
        missing = SERVERS[name].missing()
        if missing is None:
            runnable.append(name)
            continue
        message = "{}: not available ({})".format(SERVERS[name].label, missing)
        if args.servers:
            _log("python -m bench: " + message)
            return 2
        notes.append(message)
        _log(message)
    servers = runnable

    nofile = _raise_nofile()
    settings = Settings(
        warmup=args.warmup,
        duration=args.duration,
        window=args.window,
        size=args.size,
        s1_subscribers=args.s1_subscribers,
        s2_subscribers=args.s2_subscribers,
        s2_rates=args.s2_rates,
        s3_connections=args.idle_connections,
        s45_subscribers=args.s45_subscribers,
        s6_members=args.big_room_members,
        storm_connections=args.storm_connections,
        storm_concurrency=args.storm_concurrency,
        s9_rate=args.s9_rate,
        s9_size=args.s9_size,
        s9_max_buffer=args.s9_max_buffer,
        # The server needs a few descriptors of its own besides its clients.
        max_connections=max(1, nofile - 64),
        nofile_limit=nofile,
        stop_grace=args.stop_grace,
    )
    if args.quick:
        settings = dataclasses.replace(
            settings,
            warmup=0.0,
            messages=200,
            s1_subscribers=[20],
            s2_subscribers=20,
            s2_rates=[200.0],
            s3_connections=[200],
            s45_subscribers=20,
            s6_members=[200],
            storm_connections=[200],
            s9_rate=200.0,
            s9_slow=2,
            drain_max=20.0,
            settle=0.3,
        )

    server_cpu, loadgen_cpu, cpu_note = _cpus(args)
    if cpu_note:
        notes.append(cpu_note)
        _log("warning: " + cpu_note)

    try:
        exe = build(args.cache_dir)
    except BuildError as e:
        _log("python -m bench: {}".format(e))
        return 2

    keep_logs = args.log_dir is not None
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="broadcaster-bench-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(exe, server_cpu, loadgen_cpu, log_dir, settings)

    # What runs where: (scenario, variant) and the servers that can run it.
    unavailable: List[Dict] = []
    plan = []
    for scenario in scenarios:
        able = []
        for name in servers:
            reason = scenario.unavailable(SERVERS[name])
            if reason is None:
                able.append(name)
            else:
                unavailable.append({"scenario": scenario.id, "server": name, "reason": reason})
                _log("{} on {}: {}".format(scenario.id, SERVERS[name].label, reason))
        if able:
            for note in getattr(scenario, "notes", lambda ctx: [])(ctx):
                notes.append(note)
                _log("note: " + note)
            for variant in scenario.variants(settings):
                plan.append((scenario, variant, able))

    description = machine.describe()
    _log(
        "machine: {} ({} cores), Python {}, Twisted {}, Autobahn {}, websockets {}, picows {}".format(
            description["cpu_model"], description["cores"], description["python"],
            description["packages"]["twisted"], description["packages"]["autobahn"],
            description["packages"]["websockets"], description["packages"]["picows"],
        )
    )
    _log("servers on CPU {}, load generator on CPU {}; logs in {}".format(server_cpu, loadgen_cpu, log_dir))

    floor = None
    if any(scenario.id in ("S1", "S2") for scenario, _, _ in plan):
        # What no server can beat here: printed beside the latencies.
        try:
            floor = send_floor(
                count=settings.s2_subscribers, size=settings.size,
                sender_cpu=server_cpu, reader_cpu=loadgen_cpu,
            )
        except OSError as e:
            _log("system floor not measured: {}".format(e))
        else:
            notes.append(describe_floor(floor))
            _log(notes[-1])

    # SIGTERM as Ctrl-C: the context managers then stop every process started.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    runs: List[Dict] = []
    total = sum(len(able) for _, _, able in plan) * args.repeat
    started = time.monotonic()
    interrupted = False
    try:
        count = 0
        for repetition in range(1, args.repeat + 1):
            for scenario, variant, able in plan:
                shift = (repetition - 1) % len(able)
                for name in able[shift:] + able[:shift]:
                    count += 1
                    spec = SERVERS[name]
                    record = {
                        "scenario": scenario.id,
                        "variant": variant.key,
                        "variant_label": variant.label,
                        "server": name,
                        "repetition": repetition,
                    }
                    t0 = time.monotonic()
                    try:
                        record.update(scenario.run(ctx, spec, variant, repetition))
                    except (ServerError, LoadGenError, OSError) as e:
                        record.update({"ok": False, "problems": ["failed: {}".format(e)]})
                    record["seconds"] = round(time.monotonic() - t0, 2)
                    runs.append(record)
                    summary = (
                        scenario.headline(record["figures"]) if "figures" in record else "FAILED"
                    )
                    extra = ""
                    if record.get("figures", {}).get("loadgen_cpu_pct") is not None:
                        extra = "; load generator CPU {:.0f}%".format(
                            record["figures"]["loadgen_cpu_pct"]
                        )
                    _log(
                        "[{}/{}] {} {} / {} (rep {}): {}{} ({:.0f} s)".format(
                            count, total, scenario.id, variant.label, spec.label, repetition,
                            summary, extra, record["seconds"],
                        )
                    )
                    for problem in record.get("problems", []):
                        _log("    problem: " + problem)
                    for warning in record.get("warnings", []):
                        _log("    warning: " + warning)
    except KeyboardInterrupt:
        interrupted = True
        _log("interrupted: every server and load generator started has been stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)

    rows = report.summarize([(s, v) for s, v, _ in plan], runs, servers)
    comparisons = report.comparisons(rows, len(os.sched_getaffinity(0)))
    targets = report.targets(rows, settings.s2_subscribers, floor)
    stalled = report.stalled_cuts(runs)
    ok = not interrupted and all(r.get("ok") for r in runs)
    document = {
        "benchmark": "broadcaster fan-out (python -m bench)",
        "format": 1,
        "command": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "machine": description,
        "floor": floor,
        "settings": dict(
            dataclasses.asdict(settings),
            repeat=args.repeat,
            quick=args.quick,
            server_cpu=server_cpu,
            loadgen_cpu=loadgen_cpu,
        ),
        "reference": REFERENCE,
        "servers": {
            name: {
                "label": SERVERS[name].label,
                "description": SERVERS[name].description,
                "command": [a.replace("54321", "PORT") for a in SERVERS[name].argv(54321)],
            }
            for name in servers
        },
        "scenarios": {
            s.id: s.title.format(window=settings.window, size=settings.size) for s in scenarios
        },
        "charts": {s.id: s.chart for s in scenarios if s.chart},
        "notes": notes,
        "unavailable": unavailable,
        "runs": runs,
        "summary": rows,
        "comparisons": comparisons,
        "targets": targets,
        "stalled": stalled,
        "ok": ok,
        "interrupted": interrupted,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    report.write_json(args.json_out, document)
    from bench import charts

    why_not = charts.available()
    if why_not is None:
        drawn = charts.write_charts(document, args.json_out.parent)
        chart_note = "charts: {}".format(", ".join(str(path) for path in drawn))
    else:
        chart_note = "charts: " + why_not

    print()
    print(report.format_table(rows, unavailable))
    for line in (
        report.format_targets(targets) + report.format_comparisons(comparisons)
        + report.format_stalled(stalled) + notes
    ):
        print(line)
    print()
    print("results: {}".format(args.json_out))
    print(chart_note)
    if ok and not keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        print("logs: {}".format(log_dir))
    if interrupted:
        return 130
    return 0 if ok else 1
