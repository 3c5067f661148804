"""``mmembed compare``: scores.json files, eval folders and training runs side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mmembed.eval import compare


def _scores(path: Path, values: dict[str, float], metas: dict[str, str]) -> Path:
    """A hand-made scores.json: per-dataset hit@1 (and mrr = hit@1 / 2), meta-task means and the overall mean."""
    ds = {n: {"hit@1": v, "mrr": v / 2, "n": 10, "meta_task": metas[n]} for n, v in values.items()}
    groups: dict[str, list[float]] = {}
    for n, v in values.items():
        groups.setdefault(metas[n], []).append(v)
    doc = {
        "datasets": ds,
        "meta_tasks": {m: {"hit@1": sum(v) / len(v), "datasets": []} for m, v in groups.items()},
        "overall": sum(values.values()) / len(values),
        "means": {"mrr": sum(values.values()) / len(values) / 2},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    return compare.run(p.parse_args(argv))


METAS = {"N24News": "CLS", "VOC2007": "CLS", "MSCOCO_t2i": "RET"}


def test_two_scores_side_by_side_with_the_best_marked(tmp_path: Path, capsys) -> None:
    a = _scores(tmp_path / "base" / "scores.json", {"N24News": 0.5, "VOC2007": 0.25, "MSCOCO_t2i": 0.125}, METAS)
    _scores(tmp_path / "tuned" / "scores.json", {"N24News": 0.75, "VOC2007": 0.25, "MSCOCO_t2i": 0.0625}, METAS)
    out = tmp_path / "cmp"
    assert _run([str(a), str(tmp_path / "tuned"), "--out", str(out)]) == 0  # a file and a folder
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "| Dataset | Meta-task | base | tuned |" in lines
    assert "| N24News | CLS | 50.0 | **75.0** |" in lines
    assert "| VOC2007 | CLS | **25.0** | **25.0** |" in lines  # a tie: both are the best
    assert "| MSCOCO_t2i | RET | **12.5** | 6.2 |" in lines
    assert "| *CLS mean* | | 37.5 | **50.0** |" in lines
    assert "| **Overall** | | 29.2 | **35.4** |" in lines
    assert lines.index("| N24News | CLS | 50.0 | **75.0** |") < lines.index("| MSCOCO_t2i | RET | **12.5** | 6.2 |")
    assert (out / "compare.md").read_text() in printed
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _run([str(a), str(tmp_path / "tuned"), "--metric", "mrr", "--labels", "A,B"]) == 0
    assert "| N24News | CLS | 25.0 | **37.5** |" in capsys.readouterr().out


def test_training_run_uses_eval_scores_or_the_last_eval_record(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.9, "eval/N24News/hit@1": 0.2, "eval/CLS": 0.2, "eval/overall": 0.2},
        {"step": 4, "loss": 0.8, "eval/N24News/hit@1": 0.4, "eval/CLS": 0.4, "eval/overall": 0.4,
         "eval/mean_hit@1": 0.4, "eval/select/overall": 0.4},
        {"step": 5, "loss": 0.7, "eval/error": "RuntimeError: boom"},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    other = _scores(tmp_path / "other" / "scores.json", {"N24News": 0.3, "MSCOCO_t2i": 0.1}, METAS)
    assert _run([str(run), str(other)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| Dataset | Meta-task | run@4 | other |" in lines
    assert "| N24News | CLS | **40.0** | 30.0 |" in lines and "| MSCOCO_t2i | RET | - | 10.0 |" in lines
    assert "| *mean over the 1 shared* | | **40.0** | 30.0 |" in lines  # the runs cover different datasets
    _scores(run / "eval" / "scores.json", {"N24News": 0.9}, METAS)  # `mmembed eval RUN/final --out RUN/eval`
    assert _run([str(run)]) == 0
    assert "| N24News | CLS | 90.0 |" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["missing", "empty_dir", "bad_json", "no_eval"])
def test_bad_arguments_are_one_line_exit_2(tmp_path: Path, capsys, what: str) -> None:
    arg = tmp_path / "x"
    if what == "empty_dir":
        arg.mkdir()
    elif what == "bad_json":
        arg = tmp_path / "scores.json"
        arg.write_text("{not json")
    elif what == "no_eval":
        arg.mkdir()
        (arg / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert _run([str(arg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmembed: error:") and str(arg) in err[0]
