"""The line under `evaluate`'s table says which queries its averages are over."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.engine import evaluate as evaluate_module
from reidkit.engine.evaluate import EvaluationReport
from reidkit.retrieval.metrics import RankingMetrics

runner = CliRunner()


def report(ap_mode: str) -> EvaluationReport:
    metrics = RankingMetrics(
        cmc=np.array([0.5, 0.75]),
        mAP=0.4,
        mINP=0.3,
        num_valid_queries=3,
        num_skipped_queries=1,
        ap_mode=ap_mode,
    )
    return EvaluationReport("tiny", "smoke", metrics, 4, 9, "g", False, False, None)


@pytest.mark.parametrize(
    ("ap_mode", "wording"),
    [
        ("torchreid", "AP mode: torchreid; valid queries 3, skipped 1;"),
        (
            "official",
            "AP mode: official; averaged over all 4 queries: valid queries 3, 1 without a true "
            "match scored 0;",
        ),
    ],
)
def test_protocol_line_names_the_queries_averaged_over(monkeypatch, tmp_path, ap_mode, wording):
    monkeypatch.setattr(evaluate_module, "run_evaluation", lambda *a, **k: report(ap_mode))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "last.pt"), "--ap-mode", ap_mode])
    assert result.exit_code == 0, result.output
    assert wording in " ".join(result.stdout.split())


def test_a_reference_row_names_its_source_and_shows_unpublished_ranks_as_dashes(
    monkeypatch, tmp_path
):
    from dataclasses import replace

    from reidkit.config import load_preset

    row = load_preset("bot").paper["market1501"]
    with_row = replace(report("torchreid"), preset="bot", paper=row)
    monkeypatch.setattr(evaluate_module, "run_evaluation", lambda *a, **k: with_row)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "last.pt")])
    assert result.exit_code == 0, result.output
    line = next(text for text in result.stdout.splitlines() if "Luo et al." in text)
    cells = [cell.strip() for cell in line.split("│") if cell.strip()]
    assert cells == ["Luo et al. 2019 (BoT)", "94.1", "-", "-", "85.7", "-"]
