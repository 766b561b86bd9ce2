"""The gallery options on the command line: each reaches the engine as given, Milvus addresses
stay text, and refusals and Ctrl-C are one line."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.engine import evaluate as evaluate_module
from reidkit.engine import search as search_module
from reidkit.retrieval.filters import GalleryFilter, TimeBound, parse_time

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def record(monkeypatch, module, name: str, result) -> list[dict]:
    signature = inspect.signature(getattr(module, name))
    calls = []

    def fake(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return result

    monkeypatch.setattr(module, name, fake)
    return calls


def an_extraction(out, collection=None, resumed=0):
    return search_module.ExtractResult(out, collection, 10, 5, resumed, 6, 2.0, 2)


def test_extract_into_milvus_passes_the_address_as_text_and_each_option(monkeypatch, tmp_path):
    out = "milvus:http://gpu-box:19530"  # a Path would fold '//' and lose the server
    calls = record(monkeypatch, search_module, "build_gallery_index", an_extraction(out, "cams"))
    result = invoke(
        "extract", tmp_path / "last.pt", "--images", "pics", "--out", out, "--collection", "cams",
        "--meta", "meta.csv", "--shards", "work/shards",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["out"] == out
    assert (call["collection"], call["meta_csv"], call["shards"]) == (
        "cams", Path("meta.csv"), Path("work/shards"),
    )  # fmt: skip
    assert "embedded 6 images in 2.0 s (3.0 images/s over 2 process(es))" in result.stdout
    assert f"gallery: {out} collection cams (10 rows)" in result.stdout


def test_extract_says_when_it_resumed(monkeypatch, tmp_path):
    record(monkeypatch, search_module, "build_gallery_index", an_extraction("i", resumed=3))
    result = invoke("extract", tmp_path / "last.pt", "--dataset", "tiny", "--out", "i")
    assert "resumed: 3 of 5 shards were finished by an earlier run" in result.stdout


def test_ctrl_c_in_extract_says_which_shards_are_kept_and_how_to_resume(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "build_gallery_index", interrupted)
    monkeypatch.chdir(tmp_path)
    args = ("extract", tmp_path / "last.pt", "--dataset", "tiny", "--out", "milvus:g.db",
            "--collection", "cams")  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 130
    message = result.stderr.strip()
    assert "no feature shard was finished; run again with: reidkit extract" in message
    assert message.endswith("--out milvus:g.db --collection cams")
    shards = tmp_path / "g.db.shards"  # beside the database
    shards.mkdir()
    for name in ("features-000000000000-000000000004.npy", "shards.json"):
        (shards / name).write_text("")
    message = invoke(*args).stderr.strip()
    assert f"the 1 finished feature shard(s) are kept in {shards}, and the same command " in message


@pytest.mark.parametrize(
    ("options", "index", "where"),
    [
        ((), None, None),
        (("--index", "gal"), Path("gal"), None),
        (("--index", "milvus:g.db", "--camera", "3-5"), "milvus:g.db", GalleryFilter((3, 4, 5))),
        (
            ("--after", "100", "--before", "250", "--path-prefix", "/data/cam_3/"),
            None,
            GalleryFilter(None, TimeBound("frame", 100), TimeBound("frame", 250), "/data/cam_3/"),
        ),
        (
            ("--after", "2024-05-01T10:00"),
            None,
            GalleryFilter(after=parse_time("2024-05-01T10:00")),
        ),
    ],
    ids=["defaults", "folder", "milvus-cameras", "frames-prefix", "timestamp"],
)
def test_search_passes_the_gallery_and_its_filter(monkeypatch, tmp_path, options, index, where):
    calls = record(monkeypatch, search_module, "search_index", [])
    monkeypatch.setattr(search_module, "save_results_montage", lambda results, out: out)
    result = invoke("search", "q.jpg", *options, "--collection", "cams", "--save", tmp_path / "r")
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert (call["index"], call["where"], call["collection"]) == (index, where, "cams")


def test_a_bad_filter_is_one_line_before_any_work(monkeypatch, tmp_path):
    calls = record(monkeypatch, search_module, "search_index", [])
    line = error_line(invoke("search", "q.jpg", "--after", "ten", "--save", tmp_path / "r.png"))
    assert "--after: 'ten' is neither a frame number nor an ISO 8601 date" in line
    line = error_line(invoke("search", "q.jpg", "--camera", "c3", "--save", tmp_path / "r.png"))
    assert "--camera 'c3': give camera numbers" in line
    assert calls == []


@pytest.fixture
def report():
    import numpy as np

    from reidkit.engine.evaluate import EvaluationReport
    from reidkit.retrieval.metrics import RankingMetrics

    metrics = RankingMetrics(np.array([0.5, 1.0]), 0.6, 0.5, 2, 0, "torchreid")
    return EvaluationReport("tiny", "smoke", metrics, 2, 4, "g", False, False, None,
                            gallery="milvus:/x/g.db (collection cams)")  # fmt: skip


def test_evaluate_passes_the_gallery_and_names_it(monkeypatch, tmp_path, report):
    calls = record(monkeypatch, evaluate_module, "run_evaluation", report)
    result = invoke("evaluate", tmp_path / "last.pt", "--gallery", "milvus:g.db",
                    "--collection", "cams")  # fmt: skip
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert (call["gallery"], call["collection"]) == ("milvus:g.db", "cams")
    assert "gallery ranked in milvus:/x/g.db (collection cams)" in result.stdout


def test_evaluate_with_a_gallery_refuses_rerank_in_one_line(tmp_path):
    line = error_line(invoke("evaluate", tmp_path / "last.pt", "--gallery", "g", "--rerank"))
    assert "--rerank needs every gallery feature in memory" in line
