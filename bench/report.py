"""
Medians over repetitions, the table printed at the end, and the JSON file.

Every figure of every run goes in the JSON file; the table shows, per
scenario variant, figure and server, the median over the runs, the
range, and the ratio of the median to the Autobahn reference server's
(higher or lower being better as the figure says).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bench.scenarios import LOADGEN_CPU_LIMIT
from bench.servers import REFERENCE, SERVERS


def summarize(
    plan: Sequence[tuple], runs: Sequence[Dict], servers: Sequence[str]
) -> List[Dict]:
    """
    One row per (variant, figure, server) that has at least one value.

    :param plan: ``(scenario, variant)`` pairs in the order to report them.
    :param runs: run records (with ``variant``, ``server``, ``figures``).
    """
    rows = []
    for scenario, variant in plan:
        for metric in scenario.metrics:
            medians: Dict[str, Optional[float]] = {}
            per_server = {}
            for server in servers:
                mine = [
                    r for r in runs
                    if r["variant"] == variant.key and r["server"] == server and "figures" in r
                ]
                values = [
                    r["figures"].get(metric.key) for r in mine
                    if r["figures"].get(metric.key) is not None
                ]
                if not values:
                    continue
                medians[server] = statistics.median(values)
                per_server[server] = (mine, values)
            reference = medians.get(REFERENCE)
            for server, (mine, values) in per_server.items():
                median = medians[server]
                ratio = None
                if not metric.better:
                    ratio = None
                elif reference not in (None, 0) and server != REFERENCE:
                    ratio = median / reference
                elif server == REFERENCE:
                    ratio = 1.0
                flags = []
                if any(not r.get("ok", True) for r in mine):
                    flags.append("check-failed")
                if any(
                    (r["figures"].get("loadgen_cpu_pct") or 0) > LOADGEN_CPU_LIMIT for r in mine
                ):
                    flags.append("loadgen-busy")
                rows.append(
                    {
                        "scenario": scenario.id,
                        "variant": variant.key,
                        "variant_label": variant.label,
                        "metric": metric.key,
                        "metric_label": metric.label,
                        "better": metric.better,
                        "digits": metric.digits,
                        "server": server,
                        "values": values,
                        "median": median,
                        "min": min(values),
                        "max": max(values),
                        "runs": len(values),
                        "ratio_to_reference": ratio,
                        "flags": flags,
                    }
                )
    return rows


def _num(value: Optional[float], digits: int) -> str:
    if value is None:
        return "-"
    return "{:,.{}f}".format(value, digits)


def format_table(rows: Sequence[Dict], unavailable: Sequence[Dict]) -> str:
    """
    The table for the terminal: one line per scenario variant and figure,
    one column per server with its median and, after ``×``, the ratio of
    that median to the Autobahn reference's.
    """
    servers: List[str] = []
    for row in rows:
        if row["server"] not in servers:
            servers.append(row["server"])
    order = [name for name in SERVERS if name in servers]
    lines = []
    index: Dict[tuple, Dict[str, Dict]] = {}
    for row in rows:
        key = (row["scenario"], row["variant_label"], row["metric_label"], row["better"])
        if key not in index:
            index[key] = {}
            lines.append(key)
        index[key][row["server"]] = row

    def cell(row: Optional[Dict]) -> str:
        if row is None:
            return ""
        text = _num(row["median"], row["digits"])
        ratio = row["ratio_to_reference"]
        if ratio is not None and row["server"] != REFERENCE:
            text += " (×{:.2f})".format(ratio)
        if "check-failed" in row["flags"]:
            text += " ✗"
        if "loadgen-busy" in row["flags"]:
            text += " !"
        return text

    header = ["scenario", "variant", "figure (median of runs)", "better"] + [
        SERVERS[name].label for name in order
    ]
    table = [
        [scenario, variant, metric, better or ""] + [cell(index[key].get(name)) for name in order]
        for key in lines
        for scenario, variant, metric, better in [key]
    ]
    widths = [max([len(header[i])] + [len(r[i]) for r in table]) for i in range(len(header))]

    def render(cells) -> str:
        return "  ".join(
            c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [render(header), render(["-" * w for w in widths])]
    previous = None
    for key, cells in zip(lines, table):
        if previous is not None and key[:2] != previous:
            out.append("")
        previous = key[:2]
        out.append(render(cells))
    runs = sorted({r["runs"] for r in rows})
    out.append("")
    out.append(
        "(×N): the median divided by autobahn-ref's; runs per figure: {}".format(
            ", ".join(map(str, runs)) or "-"
        )
    )
    if any("check-failed" in r["flags"] for r in rows):
        out.append("✗ a run's delivery check failed (see problems in the JSON file)")
    if any("loadgen-busy" in r["flags"] for r in rows):
        out.append(
            "! the load generator used over {:.0f}% of its core in a run: it may have been"
            " the limit".format(LOADGEN_CPU_LIMIT)
        )
    for item in unavailable:
        out.append(
            "{} on {}: {}".format(item["scenario"], SERVERS[item["server"]].label, item["reason"])
        )
    return "\n".join(out)


#: The issue's targets: cross-node at least 0.8x one node; --workers 2 at
#: least 1.7x one process (with 4 cores or more).
CROSS_NODE_TARGET = 0.8
WORKERS_TARGET = 1.7


def _median(rows: Sequence[Dict], variant: str, metric: str = "deliveries_per_s") -> Optional[float]:
    for row in rows:
        if row["variant"] == variant and row["metric"] == metric and row["server"] == "broadcaster":
            return row["median"]
    return None


def comparisons(rows: Sequence[Dict], cores: Optional[int] = None) -> List[Dict]:
    """
    broadcaster against itself: S4 (cross-node) over S1 with as many
    subscribers (single node) from the same run, and S5's ``--workers 2``
    over one process.  Only those whose figures both exist.  S5's target
    is only judged with ``cores`` of 4 or more.
    """
    found = []
    for row in rows:
        if row["server"] != "broadcaster" or row["metric"] != "deliveries_per_s":
            continue
        if row["scenario"] == "S4":
            n = row["variant"].split("/")[1]
            single = _median(rows, "S1/{}".format(n))
            if single:
                found.append({
                    "what": "S4 cross-node / S1 single node, {} subscribers, deliveries/s".format(n),
                    "numerator": row["median"],
                    "denominator": single,
                    "ratio": row["median"] / single,
                    "target": CROSS_NODE_TARGET,
                })
        elif row["scenario"] == "S5" and row["variant"].endswith("/w2"):
            one = _median(rows, row["variant"][: -len("/w2")] + "/w1")
            if one:
                found.append({
                    "what": "S5 --workers 2 / one process, {} subscribers, deliveries/s".format(
                        row["variant"].split("/")[1]
                    ),
                    "numerator": row["median"],
                    "denominator": one,
                    "ratio": row["median"] / one,
                    "target": WORKERS_TARGET,
                })
    for item in found:
        item["meets_target"] = item["ratio"] >= item["target"]
        if item["target"] == WORKERS_TARGET and cores is not None and cores < 4:
            item["meets_target"] = None
            item["why_not_judged"] = "{} usable CPUs; the target assumes 4 or more".format(cores)
    return found


def format_comparisons(items: Sequence[Dict]) -> List[str]:
    """Lines for the terminal, one per comparison."""
    return [
        "{}: {:,.0f} / {:,.0f} = ×{:.2f} (target ≥ ×{:.1f}: {})".format(
            item["what"], item["numerator"], item["denominator"], item["ratio"],
            item["target"],
            "met" if item["meets_target"]
            else "not met" if item["meets_target"] is False
            else "not judged: " + item["why_not_judged"],
        )
        for item in items
    ]


def write_json(path: Path, document: Dict) -> None:
    """Write the results file (creating its directory), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
