"""Ctrl-C during `prepare`: one line, exit code 130, nothing left in ROOT."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from reidkit.cli import app

runner = CliRunner()


def test_ctrl_c_in_prepare_leaves_nothing_in_root(tmp_path: Path, monkeypatch, helpers):
    from reidkit.data import prepare as prepare_module

    root = tmp_path / "root"
    root.mkdir()
    archive = helpers.build_archive(root / "Market-1501-v15.09.15.zip", helpers.small_market())

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_scan_layout", stopped)  # after the extraction
    result = runner.invoke(app, ["prepare", "market", str(root), "--allow-mismatch"])
    assert result.exit_code == 130, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert "no manifest was written" in line and "temporary extraction was removed" in line
    assert line.endswith(f"run again with: reidkit prepare market {root} --allow-mismatch")
    assert sorted(p.name for p in root.iterdir()) == [archive.name]
