import json
from pathlib import Path

import pytest
import pyarrow.parquet as pq

from engine.data import build_task_data, dataset_stats, render_stats
from tasks.example import SCHEMA, from_table

FIXTURES = Path(__file__).parents[1] / "fixtures"
NQ = Path(__file__).parents[2] / "data/nq-open-oracle.jsonl.gz"


def build_sample(out: Path) -> dict:
    """The real MDQA variant of the sample file (distractors from the NQ pool) into `out`."""
    from tiny import char_tokenizer

    sources = {"train": str(FIXTURES / "mdqa_sample.jsonl"), "eval": str(FIXTURES / "mdqa_sample.jsonl"),
               "pool": str(NQ)}
    return build_task_data("mdqa", "real", sources=sources, options={}, tokenizer=char_tokenizer(),
                           target_tokens=1500, n_train=10, n_eval=5, seed=0, out_dir=out)


def test_build_writes_splits_and_stats(tmp_path):
    out = tmp_path / "mdqa" / "real"
    stats = build_sample(out)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["build.json", "eval.parquet", "stats.json", "train.parquet", "val.parquet"]  # no tmp files
    counts = {s: pq.read_table(out / f"{s}.parquet").num_rows for s in ("train", "val", "eval")}
    # the fixture has 4 questions, one unusable; the shared file is split by hash into train / eval
    assert counts["train"] + counts["val"] + counts["eval"] == 3
    assert stats == dataset_stats(out) == json.loads((out / "stats.json").read_text())
    assert stats["provenance"]["seeds"] == {"data": 0} and stats["provenance"]["git"]["commit"]
    assert sum(stats["dropped"]["train"].values()) + sum(stats["dropped"].get("eval", {}).values()) > 0
    rows = from_table(pq.read_table(out / "train.parquet", schema=SCHEMA))
    assert all(r.n_tokens <= 1500 for r in rows)
    render_stats(stats)


def test_val_fraction_and_synthetic(tmp_path):
    from tiny import char_tokenizer

    stats = build_task_data("musique", "ll", sources={}, options={}, tokenizer=char_tokenizer(), target_tokens=800,
                            n_train=20, n_eval=5, seed=3, out_dir=tmp_path)
    assert stats["splits"]["train"]["count"] == 18 and stats["splits"]["val"]["count"] == 2
    assert "eval" not in stats["splits"]  # only the real variant gets an evaluation split
    assert sum(stats["splits"]["train"]["needle_depth_deciles"]) == 18 * 3
    assert 0.98 * 800 <= stats["splits"]["val"]["n_tokens"]["min"] <= stats["splits"]["val"]["n_tokens"]["max"] <= 800


class FirstOnly:
    """A backend that writes one valid paragraph (the first chat of its first call, bare,
    from the entity and answer its prompt names) and nonsense for everything else."""

    def __init__(self):
        self.calls = 0

    def complete(self, chats, seeds):
        import re

        self.calls += 1
        out = ["nonsense"] * len(chats)
        if self.calls == 1:
            prompt = chats[0][-1]["content"]
            entity = re.search(r'about "([^"]+)"', prompt).group(1)
            answer = re.search(r'must contain the exact text "([^"]+)"', prompt).group(1)
            out[0] = f"{entity} is an old town. Its keeper is {answer}."
        return out


def test_a_synthetic_build_records_how_much_the_llm_wrote(tmp_path):
    import io

    from rich.console import Console

    from engine.synth import SynthConfig, Synthesizer
    from tiny import char_tokenizer

    n = 6
    synth = Synthesizer(SynthConfig(backend="hf", model="m", temperature=1.0, max_retries=1), tmp_path / "cache",
                        backend=FirstOnly(), show_progress=False)
    stats = build_task_data("mdqa", "hl", sources={}, options={}, tokenizer=char_tokenizer(), target_tokens=1500,
                            n_train=n, n_eval=0, seed=0, out_dir=tmp_path / "hl", synth=synth)
    record = json.loads((tmp_path / "hl" / "build.json").read_text())["synthesis"]
    assert stats["synthesis"] == record
    counts = {k: record[k] for k in ("requests", "valid_first_try", "recovered", "fallback", "generated",
                                     "invalid_outputs", "retried", "cache_hits")}
    assert counts == {"requests": n, "valid_first_try": 1, "recovered": 0, "fallback": n - 1,
                      "generated": n + (n - 1), "invalid_outputs": 2 * (n - 1), "retried": n - 1, "cache_hits": 0}
    console = Console(file=io.StringIO(), width=200)
    console.print(render_stats(stats))
    assert f"synthesis (hf, m): 1 of {n} texts written by the model (1 valid on the first try, 0 on a retry), " \
           f"{n - 1} templates, 0 from the cache" in console.file.getvalue()
    templated = build_task_data("mdqa", "ll", sources={}, options={}, tokenizer=char_tokenizer(), target_tokens=800,
                                n_train=n, n_eval=0, seed=0, out_dir=tmp_path / "ll")
    assert templated["synthesis"] is None  # no synthesizer, no record


def test_empty_dataset_is_one_clear_error_and_writes_nothing(tmp_path):
    from engine.data import build_task_data
    from tasks.build import DataError
    from tiny import char_tokenizer

    source = tmp_path / "mdqa.jsonl"
    # one question whose answer is not in its gold passage: dropped, leaving nothing
    source.write_text('{"question": "who?", "answers": ["Zed"], "ctxs": [{"title": "T", "text": "nobody here", '
                      '"hasanswer": true, "isgold": true}]}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"mdqa/real: the train split is empty .*dropped"):
        build_task_data("mdqa", "real", sources={"train": str(source), "eval": str(source), "pool": str(source)},
                        options={}, tokenizer=char_tokenizer(), target_tokens=200, n_train=4, n_eval=2, seed=0,
                        out_dir=out)
    assert not list(out.glob("*.parquet"))


def test_drop_reasons_are_whole_at_any_width_and_per_build(tmp_path):
    import io

    from rich.console import Console

    out = tmp_path / "mdqa" / "real"
    stats = build_sample(out)
    reasons = {build: sorted(r.items()) for build, r in stats["dropped"].items()}
    assert reasons["train"] and set(reasons) == {"train", "eval"}
    splits, dropped = render_stats(stats).renderables
    assert [c.header for c in splits.columns][-1] == "needle depth deciles"  # no drop counts on split rows
    rows = list(zip(*(c._cells for c in dropped.columns)))
    want = [("train + val", reason, str(n)) for reason, n in reasons["train"]]
    want += [("eval", reason, str(n)) for reason, n in reasons["eval"]] or [("eval", "none", "0")]
    assert rows == want
    for width in (80, 60):
        console = Console(file=io.StringIO(), width=width)
        console.print(dropped)
        text = console.file.getvalue()
        assert "…" not in text
        for reason, _ in reasons["train"]:
            assert reason in text, (width, text)


def test_a_failed_build_leaves_the_previous_dataset_untouched(tmp_path):
    from tasks.build import DataError
    from tiny import char_tokenizer

    out = tmp_path / "ll"
    build_task_data("musique", "ll", sources={}, options={}, tokenizer=char_tokenizer(), target_tokens=800,
                    n_train=10, n_eval=0, seed=0, out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="the train split is empty"):
        build_task_data("musique", "ll", sources={}, options={}, tokenizer=char_tokenizer(), target_tokens=5,
                        n_train=10, n_eval=0, seed=0, out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ll"]
