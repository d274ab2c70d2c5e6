"""
Pictures of a benchmark run: one SVG chart per scenario beside the JSON
results, for the README and for eyes that read bars faster than tables.

Each chart has a panel per figure the scenario judges (higher or lower is
better), or per figure it names for its chart (``charts`` in the results:
S8 the storm's time and CPU per connection, S9 the latency percentiles):
bars for the median of each server in each variant, whiskers from
the fastest to the slowest run, every server in the same colour on every
chart, and the machine and date in the title, since figures vary twofold
between machines.  The C reference server's bars (``--servers c``) are
what the machine allows.

matplotlib is optional (``pip install '.[bench]'``): without it the run
still works, and says that it drew nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List, Optional

#: One colour per server, the same on every chart.
COLOURS = {
    "broadcaster": "#1f6feb",
    "autobahn": "#8b949e",
    "websockets": "#d29922",
    "picows": "#8957e5",
    "c": "#2da44e",
    "baseline": "#bf8700",
}


def available() -> Optional[str]:
    """
    ``None`` if charts can be drawn, else why not.
    """
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install '.[bench]'): no charts drawn"
    return None


def write_charts(document: Dict, directory: Path) -> List[Path]:
    """
    Draw one SVG per scenario of ``document`` (a results file's contents)
    into ``directory``.

    :return: the files written.
    :raise ImportError: without matplotlib (see :func:`available`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    rows = document["summary"]
    machine = document.get("machine", {})
    when = str(machine.get("date", ""))[:10]
    where = "{} ({} cores)".format(machine.get("cpu_model", "?"), machine.get("cores", "?"))
    labels = {name: info.get("label", name) for name, info in document.get("servers", {}).items()}
    chosen = document.get("charts", {})
    written = []
    for scenario, title in document.get("scenarios", {}).items():
        mine = [r for r in rows if r["scenario"] == scenario and r.get("better")]
        metrics = list(dict.fromkeys(r["metric"] for r in mine))[:4]
        if scenario in chosen:
            metrics = [m for m in chosen[scenario] if m in metrics]
        if not metrics:
            continue
        figure, axes = plt.subplots(
            1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False
        )
        for axis, metric in zip(axes[0], metrics):
            _panel(axis, [r for r in mine if r["metric"] == metric], labels)
            # 2.3M, 150k: readable at a glance.
            axis.yaxis.set_major_formatter(EngFormatter(sep=""))
        figure.suptitle(
            "{} {}\n{}, {}".format(scenario, title, where, when), fontsize=10
        )
        figure.tight_layout()
        path = directory / "{}.svg".format(scenario)
        # No date in the file: a chart changes only when its figures do.
        figure.savefig(path, format="svg", metadata={"Date": None})
        plt.close(figure)
        written.append(path)
    return written


def _panel(axis, rows: List[Dict], labels: Dict[str, str]) -> None:
    variants = list(dict.fromkeys(r["variant_label"] for r in rows))
    servers = list(dict.fromkeys(r["server"] for r in rows))
    width = 0.8 / max(len(servers), 1)
    for i, server in enumerate(servers):
        xs, heights, low, high = [], [], [], []
        for j, variant in enumerate(variants):
            row = next(
                (r for r in rows if r["server"] == server and r["variant_label"] == variant), None
            )
            if row is None or row.get("median") is None:
                continue
            xs.append(j + (i - (len(servers) - 1) / 2) * width)
            heights.append(row["median"])
            low.append(row["median"] - (row.get("min") if row.get("min") is not None else row["median"]))
            high.append((row.get("max") if row.get("max") is not None else row["median"]) - row["median"])
        colour = COLOURS.get(server.split("@")[0], COLOURS["baseline"] if "@" in server else "#57606a")
        axis.bar(
            xs, heights, width * 0.95, yerr=[low, high], capsize=2, color=colour,
            label=labels.get(server, server),
        )
    metric = rows[0]
    axis.set_title(
        "{} ({} is better)".format(metric["metric_label"], metric["better"]), fontsize=9
    )
    axis.set_xticks(range(len(variants)))
    axis.set_xticklabels(variants, fontsize=8)
    axis.tick_params(axis="y", labelsize=8)
    axis.legend(fontsize=7)
