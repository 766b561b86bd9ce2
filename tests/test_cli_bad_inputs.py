"""Bad input that used to end in a traceback or a misleading line: each one is one line naming
the thing and the fix (presets that are not UTF-8 or not files, checkpoints that do not fit,
a conflicting --preset on --resume, --stage 0, a missing onnxscript, Ctrl-C in prepare)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.config import load_preset
from reidkit.data import prepare as prepare_module
from reidkit.engine.checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint
from reidkit.errors import CheckpointError, ConfigError
from reidkit.models.net import build_model

runner = CliRunner()


def invoke(*args: str | Path, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_line_error(result, *fragments: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe[train]\n",  # not UTF-8
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",  # a PNG renamed .toml
        "[train]\nepochs = 3\n".encode("utf-16"),  # UTF-16, with its byte-order mark
    ],
)
def test_a_preset_that_is_not_utf8_text_is_one_line(tmp_path: Path, content: bytes):
    preset = tmp_path / "binary.toml"
    preset.write_bytes(content)
    with pytest.raises(ConfigError, match=f"preset {preset} is not a UTF-8 text file"):
        load_preset(preset)
    one_line_error(invoke("train", "--preset", preset), "is not a UTF-8 text file")


def test_a_device_is_not_a_preset_or_a_checkpoint_and_is_named_so():
    line = one_line_error(invoke("train", "--preset", "/dev/null"), "/dev/null is not a regular")
    assert "does not exist" not in line
    line = one_line_error(invoke("evaluate", "/dev/zero"), "/dev/zero is not a regular file")
    assert "does not exist" not in line


def test_prepare_into_a_root_that_is_a_file_says_it_is_a_file(tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    line = one_line_error(invoke("prepare", "synthetic", notes), f"ROOT {notes} is a file")
    assert "File exists" not in line and notes.read_text() == "mine"


# ------------------------------------------------------------------ checkpoints and runs


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_line_naming_the_file(
    tiny_config, tmp_path: Path
):
    config = tiny_config("attention.kind=none")
    weights = build_model(config, 8).state_dict()
    edited = tmp_path / "edited.pt"
    save_checkpoint(edited, Checkpoint(config, weights, 12, 1, "pcb"))  # num_ids 8 -> 12
    with pytest.raises(CheckpointError) as err:
        load_model(edited)
    message = str(err.value)
    assert message.startswith(f"{edited}: its weights do not fit its own config (num_ids 12")
    assert "of another shape (e.g. head." in message and "x8 in the file, " in message
    assert "\n" not in message and "size mismatch" not in message
    one_line_error(invoke("evaluate", edited), str(edited), "do not fit")
    partial = tmp_path / "partial.pt"
    missing = {k: v for k, v in weights.items() if not k.startswith("head.")}
    save_checkpoint(partial, Checkpoint(config, missing, 8, 1, "pcb"))
    with pytest.raises(CheckpointError, match=f"^{partial}: .* missing \\(e.g. head\\."):
        load_model(partial)


def test_resume_with_another_preset_is_refused_like_another_dataset(tiny_checkpoint: Path):
    run = tiny_checkpoint.parent
    before = load_checkpoint(tiny_checkpoint).epoch
    line = one_line_error(invoke("train", "--preset", "pcb", "--out", run, "--resume"))
    assert "was trained with preset smoke, not pcb" in line and "drop --preset" in line
    assert load_checkpoint(tiny_checkpoint).epoch == before


def test_attention_stage_0_is_refused_not_drawn_as_stage_1(tiny_checkpoint, tiny_root, tmp_path):
    image = sorted((tiny_root / "tiny" / "query").glob("*.jpg"))[0]
    out = tmp_path / "fig.png"
    result = invoke("attention", tiny_checkpoint, image, "--stage", 0, "--out", out)
    one_line_error(result, "has attention after stages [1, 2, 3], not 0")
    assert not out.exists()


def test_export_without_onnxscript_names_the_missing_package(
    tiny_checkpoint, tmp_path, monkeypatch
):
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` fails
    result = invoke("export", tiny_checkpoint, "--out", tmp_path / "m.onnx")
    one_line_error(result, "onnx, onnxscript and onnxruntime (onnxscript missing)", "[export]")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ prepare interrupted


def test_ctrl_c_in_prepare_synthetic_gives_the_command_that_makes_the_same_dataset(
    tmp_path: Path, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "prepare_dataset", interrupted)
    options = ("--train-ids", 400, "--test-ids", 300, "--cameras", 6, "--seed", 3)
    result = invoke("prepare", "synthetic", tmp_path, *options)
    assert result.exit_code == 130, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    again = line.split("run again with: ")[1]
    assert again.startswith(f"reidkit prepare synthetic {tmp_path} ")
    assert "--seed 3 --train-ids 400 --test-ids 300 --cameras 6" in again
    assert "extraction" not in line and "the images generated so far were removed" in line


# ------------------------------------------------------------------ piped output


def test_a_piped_table_title_with_wide_characters_stays_on_one_line(tiny_root, tmp_path: Path):
    frame = pd.read_csv(tiny_root / "tiny" / "manifest.csv")
    frame["path"] = [str(tiny_root / "tiny" / p) for p in frame["path"]]
    csv = tmp_path / "people.csv"
    frame.to_csv(csv, index=False)
    name = "c ü 人"  # the last character takes two cells
    result = invoke(
        "prepare", "custom", tmp_path, "--source", csv, "--name", name, env={"COLUMNS": None}
    )
    assert result.exit_code == 0, result.output
    title = f"{name}: {tmp_path / name / 'manifest.csv'}"
    assert any(line.strip() == title for line in result.stdout.splitlines()), result.stdout
