"""`--help` reads as words a user types, and tells where the settings and dataset names are."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import typer.main
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.config import AttentionConfig, DataConfig, EvalConfig, ModelConfig, TrainConfig
from reidkit.data.datasets import DATASETS, LIST_DATASETS

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


def help_text(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}, prog_name="reidkit")
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [(), *((name,) for name in COMMANDS)])
def test_help_shows_no_python_types(command):
    text = help_text(*command)
    # typer 0.27 writes the annotations (<str>, <bool>, <list[str]>) and `{dataset} {root}`
    assert not re.search(r"<(str|bool|int|float|path|list\[)", text, re.IGNORECASE), text
    (usage,) = [line for line in text.splitlines() if "Usage:" in line]
    assert "{" not in usage and "list[" not in usage


def test_every_option_that_takes_a_value_names_it():
    group = typer.main.get_command(app)
    unnamed = [
        f"{name} {param.opts[0]}"
        for name, command in group.commands.items()
        for param in command.params
        if param.param_type_name == "option" and not param.is_flag and param.metavar is None
    ]
    assert unnamed == []


def test_usage_names_the_arguments_in_capitals():
    assert "Usage: reidkit prepare [OPTIONS] DATASET ROOT" in help_text("prepare")
    assert "Usage: reidkit search [OPTIONS] IMAGE..." in help_text("search")
    assert "Usage: reidkit attention [OPTIONS] CHECKPOINT IMAGE" in help_text("attention")


def test_train_help_names_the_datasets_and_where_the_set_keys_are():
    text = " ".join(help_text("train").split())  # the help column wraps
    names = {"synthetic", *LIST_DATASETS}
    names |= {v.default_name for spec in DATASETS.values() for v in spec.variants.values()}
    assert [name for name in sorted(names) if name not in text] == []
    assert "--set KEY=VALUE" in text
    assert "`reidkit presets --keys` lists every key" in text


def test_presets_keys_lists_every_setting_with_its_values_and_default():
    result = runner.invoke(app, ["presets", "--keys"], env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) == 3 and "." in cells[0]:
            rows[cells[0]] = (cells[1], cells[2])
    classes = {
        "data": DataConfig,
        "model": ModelConfig,
        "attention": AttentionConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
    }
    expected = {f"{section}.{f.name}" for section, cls in classes.items() for f in fields(cls)}
    assert set(rows) == expected
    assert rows["attention.kind"] == ("none|sa|csa|csalr", "csalr")
    assert rows["attention.grid"] == ("integer,integer", "12,8")
    assert rows["attention.stages"] == ("integers, comma-separated", "1,2,3")
    assert rows["model.pretrained"] == ("true|false", "true")
    assert rows["train.lr"] == ("number", "0.1")
    assert rows["data.root"] == ("text", "(empty)")
