"""Provenance against independent references: git run in the test, each package's own
__version__, and a throwaway git repository for the dirty flag."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy
import pyarrow
import scipy
import torch

from engine.provenance import REPO_ROOT, git_state, package_versions, provenance


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_records_the_checkout_packages_threads_and_seeds():
    record = provenance(seeds={"experiment": [0, 1], "bootstrap": 0}, actor_torch_threads=2)
    assert record["git"]["commit"] == git(REPO_ROOT, "rev-parse", "HEAD")
    assert record["git"]["dirty"] == bool(git(REPO_ROOT, "status", "--porcelain"))
    assert record["packages"]["torch"] == torch.__version__ and record["packages"]["numpy"] == numpy.__version__
    assert record["packages"]["scipy"] == scipy.__version__ and record["packages"]["pyarrow"] == pyarrow.__version__
    assert record["torch_threads"] == torch.get_num_threads()  # torch is loaded in this process
    assert record["seeds"] == {"experiment": [0, 1], "bootstrap": 0} and record["actor_torch_threads"] == 2
    assert record["hardware"]["cpu_count"] >= 1 and record["hardware"]["gpus"] == []
    assert package_versions(("no-such-distribution-xyz",)) == {"no-such-distribution-xyz": None}


def test_dirty_flag_and_a_directory_outside_git(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("1")
    git(repo, "add", "a.txt")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    clean = git_state(repo)
    assert clean == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "source": str(repo)}
    (repo / "a.txt").write_text("2")
    assert git_state(repo)["dirty"] is True
    outside = git_state(tmp_path / "not-a-repo")
    assert outside["commit"] is None and outside["dirty"] is None and "not a git checkout" in outside["source"]
