"""What produced a result: package versions, seeds, torch threads, hardware and the git commit.

Every result JSON the engine writes (evaluation summaries, findings, timings, probe and
comparison results, calibration, dataset statistics) carries a `provenance` entry built
here, and the report lists it, so that a number can be traced to the code and machine that
produced it. The git commit and dirty flag are read from the checkout the engine runs from;
outside a git checkout (an installed wheel, a job's uploaded working directory without
`.git`) they are null and `git.source` says why.

Example:
    >>> record = provenance(seeds={"experiment": [0]})
    >>> sorted(record)
    ['created', 'git', 'hardware', 'omp_num_threads', 'packages', 'python', 'seeds', 'torch_threads']
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# The distributions whose versions decide a result (numerics, training, statistics, I/O).
PACKAGES = ("needlework", "torch", "transformers", "peft", "accelerate", "ray", "numpy", "scipy", "pyarrow",
            "tokenizers", "safetensors", "matplotlib")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions by distribution name (None: not installed), without importing them."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit checked out at `root` and whether tracked or untracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError) as err:
        return {"commit": None, "dirty": None, "source": f"not a git checkout ({type(err).__name__})"}
    return {"commit": commit, "dirty": bool(status), "source": str(root)}


@lru_cache(maxsize=1)
def hardware() -> dict[str, Any]:
    """The machine: OS, CPU model and count, memory, GPUs (names as CUDA reports them)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "gpus": [],
    }
    if "torch" in sys.modules:  # only a process that already uses torch asks CUDA
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def torch_threads() -> int | None:
    """Intra-op threads of this process's torch; None when torch is not loaded here (a process
    that only reads artifacts), in which case `OMP_NUM_THREADS` is what a worker would get."""
    if "torch" not in sys.modules:
        return None
    import torch

    return int(torch.get_num_threads())


def provenance(seeds: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The record stored under `provenance` in a result JSON.

    Args:
        seeds: every seed that decided the result, by role (e.g. {"experiment": [0],
            "knockout": [0, 1, 2], "bootstrap": 0}).
        extra: further entries (e.g. `actor_torch_threads` for results computed on actors).
    """
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "packages": package_versions(),
        "torch_threads": torch_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "hardware": hardware(),
        "git": git_state(),
        "seeds": dict(seeds or {}),
        **extra,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return round(pages * size / 1e9, 1)
