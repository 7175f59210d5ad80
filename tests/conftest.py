import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the session's tests."""
    import ray

    if not ray.is_initialized():
        # "local": a fresh cluster for the tests, never one a `ray start` left running
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def needlework_cache(tmp_path_factory):
    """A cache shared by the session's pipeline tests, so an equal miniature is pretrained once."""
    cache = tmp_path_factory.mktemp("needlework_cache")
    old = os.environ.get("NEEDLEWORK_CACHE")
    os.environ["NEEDLEWORK_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("NEEDLEWORK_CACHE", None)
    else:
        os.environ["NEEDLEWORK_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Local checkpoints of the three tiny families, saved once per session."""
    from tiny import FAMILIES, save_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: str(save_tiny(family, root / family)) for family in FAMILIES}
