"""Option plumbing: each flag of `evaluate` and `extract` reaches the call that does the work."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.engine import evaluate as evaluate_module
from reidkit.engine import search as search_module
from reidkit.engine.evaluate import EvaluationReport
from reidkit.retrieval.metrics import RankingMetrics

runner = CliRunner()


def record_calls(monkeypatch, module, name: str, result) -> list[dict]:
    """Replace `module.name` with a fake returning `result`; each call's arguments, by name."""
    signature = inspect.signature(getattr(module, name))
    calls = []

    def fake(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return result

    monkeypatch.setattr(module, name, fake)
    return calls


def an_extraction(tmp_path: Path) -> search_module.ExtractResult:
    return search_module.ExtractResult(tmp_path / "index", None, 3, 1, 0, 3, 1.0, 1)


def a_report() -> EvaluationReport:
    metrics = RankingMetrics(
        cmc=np.array([0.5, 1.0]),
        mAP=0.6,
        mINP=0.5,
        num_valid_queries=2,
        num_skipped_queries=0,
        ap_mode="torchreid",
    )
    return EvaluationReport(
        dataset="tiny",
        preset="smoke",
        metrics=metrics,
        num_query=2,
        num_gallery=4,
        feature="g",
        flip=False,
        rerank=False,
        paper=None,
    )


EVALUATE_DEFAULTS = {
    "dataset": None,
    "root": None,
    "flip": None,  # None: the checkpoint's eval.flip decides
    "ap_mode": None,  # None: the checkpoint's eval.ap_mode decides
    "rerank": None,  # None: the checkpoint's eval.rerank decides
    "feature": None,  # None: the checkpoint's eval.feature decides
}


@pytest.mark.parametrize(
    ("options", "changed"),
    [
        ((), {}),
        (("--flip",), {"flip": True}),
        (("--no-flip",), {"flip": False}),
        (("--rerank",), {"rerank": True}),
        (("--no-rerank",), {"rerank": False}),
        (("--feature", "h"), {"feature": "h"}),
        (("--data-root", "~/reid-data"), {"root": Path.home() / "reid-data"}),
        (("--ap-mode", "official"), {"ap_mode": "official"}),
    ],
    ids=["defaults", "flip", "no-flip", "rerank", "no-rerank", "feature", "data-root", "ap-mode"],
)
def test_evaluate_passes_each_option_and_leaves_the_others_at_their_defaults(
    monkeypatch, tmp_path: Path, options, changed
):
    calls = record_calls(monkeypatch, evaluate_module, "run_evaluation", a_report())
    checkpoint = tmp_path / "last.pt"
    result = runner.invoke(app, ["evaluate", str(checkpoint), *options])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["checkpoint"] == checkpoint
    assert {key: call[key] for key in EVALUATE_DEFAULTS} == {**EVALUATE_DEFAULTS, **changed}


EXTRACT_DEFAULTS = {
    "dataset": "tiny",
    "split": "gallery",
    "images": None,
    "root": None,
    "flip": None,  # None: the checkpoint's eval.flip decides
    "feature": None,  # None: the checkpoint's eval.feature decides
}


@pytest.mark.parametrize(
    ("options", "changed"),
    [
        (("--dataset", "tiny"), {}),
        (("--dataset", "tiny", "--split", "query"), {"split": "query"}),
        (("--images", "pics"), {"dataset": None, "images": Path("pics")}),
        (("--dataset", "tiny", "--index", "hnsw"), {"index_kind": "hnsw"}),
        (("--dataset", "tiny", "--feature", "h"), {"feature": "h"}),
        (("--dataset", "tiny", "--flip"), {"flip": True}),
        (("--dataset", "tiny", "--no-flip"), {"flip": False}),
        (("--dataset", "tiny", "--data-root", "~/reid-data"), {"root": Path.home() / "reid-data"}),
    ],
    ids=["dataset", "split", "images", "index", "feature", "flip", "no-flip", "data-root"],
)
def test_extract_passes_each_option_and_leaves_the_others_at_their_defaults(
    monkeypatch, tmp_path: Path, options, changed
):
    calls = record_calls(monkeypatch, search_module, "build_gallery_index", an_extraction(tmp_path))
    checkpoint = tmp_path / "last.pt"
    result = runner.invoke(app, ["extract", str(checkpoint), *options])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["checkpoint"] == checkpoint
    assert call["out"] == search_module.DEFAULT_INDEX  # where `search` looks by default
    expected = {**EXTRACT_DEFAULTS, **changed}
    assert {key: call[key] for key in expected} == expected


def test_extract_writes_the_index_where_out_says(monkeypatch, tmp_path: Path):
    calls = record_calls(monkeypatch, search_module, "build_gallery_index", an_extraction(tmp_path))
    result = runner.invoke(
        app, ["extract", str(tmp_path / "last.pt"), "--images", "pics", "--out", "gal"]
    )
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["out"] == Path("gal") and call["images"] == Path("pics")
