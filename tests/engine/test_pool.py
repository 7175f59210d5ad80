"""The generic actor pool on a real local Ray cluster: timeouts, retries, fatal errors."""

from __future__ import annotations

import pytest
from eval_data import FlakyWorker

from engine.config import EvaluateConfig
from engine.pool import ACTOR_PREFIX, PoolError, WorkItem, run_pool


def items(*names: str) -> list[WorkItem]:
    return [WorkItem(key=name, affinity=name[0], payload=(name, i)) for i, name in enumerate(names)]


def test_hung_item_times_out_and_reports_once(tmp_path, ray_cluster):
    results: dict[str, int] = {}

    def on_result(item, value):
        assert item.key not in results  # reported exactly once
        results[item.key] = value

    work = items("a0", "a1", "hang", "a2", "a3")
    stats = run_pool(FlakyWorker, {"marks": str(tmp_path)}, work, EvaluateConfig(num_actors=2, timeout_s=4),
                     on_result, show_progress=False)
    assert results == {item.key: item.payload[1] ** 2 for item in work}
    assert stats.retries == {"hang": 1} and "timed out" in stats.failures[0]
    assert not [n for n in ray_cluster.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]


def test_retries_are_bounded_and_fatal_errors_are_not_retried(tmp_path, ray_cluster):
    config = EvaluateConfig(num_actors=1, max_retries=2, timeout_s=60)
    with pytest.raises(PoolError, match="bad failed 3 time"):
        run_pool(FlakyWorker, {"marks": str(tmp_path)}, items("bad"), config, lambda i, v: None, show_progress=False)
    with pytest.raises(KeyError, match="fatal: bad input"):
        run_pool(FlakyWorker, {"marks": str(tmp_path)}, items("fatal"), config, lambda i, v: None,
                 fatal=(KeyError,), show_progress=False)
