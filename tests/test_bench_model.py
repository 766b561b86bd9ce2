"""bench/model.py and bench/gpu_check.py: their MobileNetV2 rows (the measuring itself is a
benchmark, not a test; the GPU check needs a GPU)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench(monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(BENCH))  # the scripts import their sibling measure.py
    model = importlib.import_module("model")
    gpu_check = importlib.import_module("gpu_check")
    yield model, gpu_check
    for name in ("model", "gpu_check", "measure"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_models_mobilenet_selects_each_preset_beside_its_plain_one(bench):
    model, _ = bench
    assert model.select_models("mobilenet") == [
        "mobilenet-pcb",
        "mobilenet-pcb-sa",
        "mobilenet-pcb-csa",
        "mobilenet-pcb-csalr",
        "mobilenet-bot",
        "mobilenet-bot-csalr",
    ]
    # a twin asked alone brings its baseline, so its increase has a reference
    assert model.select_models("mobilenet-bot-csalr") == ["mobilenet-bot", "mobilenet-bot-csalr"]
    with pytest.raises(SystemExit, match="unknown model"):
        model.select_models("mobilenet-v3")


def test_a_mobilenet_row_trains_its_preset_at_its_own_input(bench, monkeypatch):
    model, _ = bench
    from reidkit.models import net as net_module

    built = []
    real = net_module.build_model

    def keep(config, num_ids):
        built.append((config, num_ids))
        return real(config, num_ids)

    monkeypatch.setattr(net_module, "build_model", keep)
    step, params = model.build_step(model.MODELS["mobilenet-pcb-csalr"], 2, "cpu", False)
    step()  # one training step runs
    ((config, num_ids),) = built
    assert (config.model.arch, config.data.height, config.data.width) == ("mobilenet_v2", 192, 64)
    assert config.attention.kind == "csalr" and config.attention.grid == (6, 4)
    assert not config.model.pretrained and num_ids == 743
    assert 2.2e6 < params < 2e7
    assert "mobilenet-pcb-csalr (MobileNetV2, 192x64), csalr, 2 groups, 24 landmarks" in model.note(
        model.MODELS["mobilenet-pcb-csalr"]
    )


def test_gpu_check_compares_each_row_with_its_own_plain_model(bench):
    _, gpu_check = bench
    assert {"mobilenet-pcb", "mobilenet-pcb-csalr"} <= set(gpu_check.COST_MODELS)
    rows = [
        {"name": name, "precision": "bf16", "ms_per_step": ms, "peak_gib": gib}
        for name, ms, gib in (
            ("pcb", 100.0, 10.0),
            ("pcb-csalr-g2", 125.0, 14.0),
            ("mobilenet-pcb", 20.0, 2.0),
            ("mobilenet-pcb-csalr", 30.0, 3.0),
        )
    ]
    gpu_check.relative_to_baseline(rows)
    increases = {r["name"]: (r["time_vs_pcb"], r["memory_vs_pcb"]) for r in rows}
    assert increases["pcb-csalr-g2"] == pytest.approx((0.25, 0.4))
    assert increases["mobilenet-pcb-csalr"] == pytest.approx((0.5, 0.5))  # over mobilenet-pcb
    assert increases["mobilenet-pcb"] == (0.0, 0.0)
    assert gpu_check.imagenet_start("bot") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check would run")
def test_gpu_check_without_a_gpu_says_so_and_exits_cleanly(bench, capsys):
    _, gpu_check = bench
    assert gpu_check.main([]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out
