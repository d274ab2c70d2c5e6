"""
What a benchmark ran on: CPU, memory, kernel, Python, package versions,
compiler, limits and the repository's commit, for the results file.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from typing import Dict, Optional

from bench.loadgen import compiler_version
from bench.servers import REPO_ROOT

PACKAGES = ("twisted", "autobahn", "txaio", "websockets", "picows")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_model() -> Optional[str]:
    """The ``model name`` of the first CPU in /proc/cpuinfo."""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or None


def memory_mib() -> Optional[int]:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def package_versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> Optional[str]:
    """A read-only git query on the repository, or ``None``."""
    # GIT_OPTIONAL_LOCKS=0: "git status" must not refresh the index either.
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        result = subprocess.run(
            ["git", *args], cwd=str(REPO_ROOT), capture_output=True, timeout=30, env=env
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.decode(errors="replace").strip()


def describe() -> Dict:
    """Everything about this machine and checkout that a result depends on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "memory_mib": memory_mib(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": package_versions(),
        "cc": compiler_version(),
        "open_files_limit": {"soft": soft, "hard": hard},
        "ephemeral_ports": (_read("/proc/sys/net/ipv4/ip_local_port_range") or "").split(),
        "somaxconn": (_read("/proc/sys/net/core/somaxconn") or "").strip() or None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }
