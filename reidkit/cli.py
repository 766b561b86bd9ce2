"""The `reidkit` command line: parse, call one function per command, print with Rich."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from reidkit.errors import ReidkitError

app = typer.Typer(
    help="Person re-identification: prepare benchmarks, train PCB/RPP + CSALR, evaluate, search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(err: Exception, code: int = 1) -> typer.Exit:
    """One red line on stderr, no traceback; the caller raises what this returns."""
    err_console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def presets() -> None:
    """List the shipped presets with a one-line description each."""
    from reidkit.config import available_presets, preset_description

    table = Table(title="presets (reidkit train --preset NAME)")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, path in available_presets().items():
        table.add_row(name, preset_description(path))
    console.print(table)


@app.command()
def prepare(
    dataset: Annotated[
        str,
        typer.Argument(
            help="market1501 | dukemtmc-reid | cuhk03-np | custom | synthetic "
            "(short names: market, duke, cuhk03)"
        ),
    ],
    root: Annotated[Path, typer.Argument(help="data root; the dataset goes to ROOT/NAME")],
    source: Annotated[
        Path | None,
        typer.Option(help="archive (.zip/.tar/.tar.gz) or folder; default: look in ROOT"),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="folder name under ROOT (default: the dataset name)")
    ] = None,
    variant: Annotated[
        str, typer.Option(help="cuhk03-np boxes: detected (the paper's) or labeled")
    ] = "detected",
    allow_mismatch: Annotated[
        bool, typer.Option(help="accept counts that differ from the published ones")
    ] = False,
    check_images: Annotated[
        bool, typer.Option(help="fully decode every image (default: header check)")
    ] = False,
    seed: Annotated[int, typer.Option(help="synthetic: random seed")] = 0,
    train_ids: Annotated[int, typer.Option(help="synthetic: training identities")] = 60,
    test_ids: Annotated[int, typer.Option(help="synthetic: test identities")] = 40,
    cameras: Annotated[int, typer.Option(help="synthetic: cameras")] = 4,
) -> None:
    """Verify a dataset against its published counts and write ROOT/NAME/manifest.csv."""
    from reidkit.data.datasets import canonical_name
    from reidkit.data.prepare import CountMismatchError, prepare_dataset
    from reidkit.data.synthetic import SyntheticSpec

    try:
        synthetic = SyntheticSpec(
            train_ids=train_ids, test_ids=test_ids, cameras=cameras, seed=seed
        )
        result = prepare_dataset(
            dataset,
            root.expanduser(),
            source=source.expanduser() if source else None,
            name=name,
            variant=variant,
            allow_mismatch=allow_mismatch,
            check_images=check_images,
            synthetic=synthetic,
        )
    except CountMismatchError as err:
        table = Table(title="counts: published vs found")
        for column in ("what", "published", "found"):
            table.add_column(column, justify="right" if column != "what" else "left")
        for what, expected, found in err.rows:
            style = "red" if expected != found else ""
            table.add_row(what, f"{expected:,}", f"{found:,}", style=style)
        err_console.print(table)
        raise fail(err) from None
    except ReidkitError as err:
        raise fail(err) from None
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    table = Table(title=f"{result.name}: {result.manifest}")
    for column in ("split", "identities", "images", "cameras"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for row in result.splits:
        table.add_row(row.split, f"{row.ids:,}", f"{row.images:,}", str(row.cameras))
    console.print(table)
    if not result.verified:
        state = "counts not verified"
    elif canonical_name(dataset) == "synthetic":
        state = "counts match the synthetic spec"
    else:
        state = "verified against the published counts"
    console.print(f"{'reused existing manifest; ' if result.reused else ''}{state}")


@app.command()
def train(
    preset: Annotated[
        str, typer.Option(help="preset name (see `reidkit presets`) or a .toml file")
    ] = "smoke",
    dataset: Annotated[
        str | None, typer.Option(help="prepared dataset (default: the preset's)")
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="where prepared datasets live (default: $REIDKIT_DATA or ~/data)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: runs/<preset>-<dataset>/)")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a setting: section.key=value (repeatable)"),
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue from OUT/last.pt")] = False,
) -> None:
    """Train a PCB / PCB-RPP model with attention; writes last.pt, metrics.csv and curves.png."""
    from reidkit.config import load_preset
    from reidkit.data.datasets import dataset_folder
    from reidkit.engine.train import fit, is_main_process

    try:
        extra = list(overrides or [])
        if dataset:
            extra.append(f"data.dataset={dataset_folder(dataset)}")
        if data_root:
            extra.append(f"data.root={data_root.expanduser()}")
        config = load_preset(preset, extra)
        checkpoint = fit(config, out, resume=resume)
    except ReidkitError as err:
        raise fail(err) from None
    if is_main_process():
        console.print(f"checkpoint: {checkpoint}")
        console.print(
            f"metrics: {checkpoint.parent / 'metrics.csv'}  curves: "
            f"{checkpoint.parent / 'curves.png'}"
        )
