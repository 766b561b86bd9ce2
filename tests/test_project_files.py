"""The README's commands stay true: CI runs exactly its test command, its presets exist."""

import re
import shlex
from pathlib import Path

from reidkit import __version__
from reidkit.config import available_presets

TOP = Path(__file__).resolve().parents[1]
CPU_WHEEL_INDEX = "https://download.pytorch.org/whl/cpu"


def ci_test_command() -> str:
    script = (TOP / ".ci" / "run").read_text()
    (assignment,) = re.findall(r"^TEST_COMMAND=(.*)$", script, flags=re.MULTILINE)
    (command,) = shlex.split(assignment)
    return command


def test_ci_runs_exactly_the_readmes_test_command():
    readme_blocks = re.findall(r"```\n(.*?)\n```", (TOP / "README.md").read_text(), re.DOTALL)
    assert ci_test_command() in readme_blocks


def test_setup_commands_install_the_cpu_torch_wheel_first():
    readme = (TOP / "README.md").read_text()
    setup = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(setup) == 2, "exactly two set-up commands"
    for line in setup:
        steps = line.split(" && ")
        torch_step = next(i for i, s in enumerate(steps) if "torch==2.13.0" in s)
        project_step = next(i for i, s in enumerate(steps) if re.search(r"install (-e )?[.\"']", s))
        assert torch_step < project_step
        # PyTorch's CPU index as an extra one: the plain index alone gives the CUDA build, and
        # replacing the index (--index-url) would hide a configured index or local wheel
        words = steps[torch_step].split()
        assert words[words.index("--extra-index-url") + 1] == CPU_WHEEL_INDEX
        assert "--index-url" not in words and "-i" not in words
    assert any(line.endswith("reidkit demo") for line in setup)


def test_readme_names_only_presets_that_exist_and_lists_them_all():
    readme = (TOP / "README.md").read_text()
    presets = set(available_presets())
    assert set(re.findall(r"--preset ([a-z0-9-]+)", readme)) <= presets
    assert presets <= set(re.findall(r"^\| `([a-z0-9-]+)` \|", readme, flags=re.MULTILINE))


def test_changelog_has_an_entry_for_this_version():
    assert f"## {__version__}" in (TOP / "CHANGELOG.md").read_text()


def test_readme_documents_every_environment_variable_the_tests_read():
    readme = (TOP / "README.md").read_text()
    read = set()
    for path in (TOP / "tests").rglob("*.py"):
        read |= set(re.findall(r"os\.environ\.get\(\s*\"(REIDKIT_\w+)\"", path.read_text()))
    assert "REIDKIT_CUHK03_SUBSET" in read
    assert {name for name in read if f"${name}" not in readme} == set()
