"""The `reidkit` command line: parse, call one function per command, print with Rich."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from reidkit.errors import Interrupted, ReidkitError
from reidkit.outputs import (
    OS_ERROR_HINTS,
    check_output_file,
    check_writable,
    json_with_mark,
    write_output_text,
    writing,
)
from reidkit.terminal import OutputConsole, invoked_as, titled_table

app = typer.Typer(
    help="Person re-identification: prepare benchmarks, train PCB/RPP + CSALR, evaluate, search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Folded only on a terminal: in a file, a pipe or CI, paths and commands stay on one line.
console = OutputConsole()
err_console = OutputConsole(stderr=True)


def describe(err: BaseException) -> str:
    """The one-line text of an error; an OSError as `PATH: reason; what to do`."""
    if not isinstance(err, OSError) or not err.strerror:
        return str(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    text = f"{' -> '.join(paths)}: {err.strerror}" if paths else err.strerror
    hint = OS_ERROR_HINTS.get(err.errno)
    return f"{text}; {hint}" if hint else text


def fail(err: BaseException, code: int = 1) -> typer.Exit:
    """One red line on stderr, no traceback; the caller raises what this returns."""
    err_console.print(f"[red]error:[/] {escape(describe(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# The values of the choice options, shown in --help as [a|b] and checked by `check_choice`
# (one red line, exit code 2, like every other refusal of an option's value).
AP_MODES = ("torchreid", "official")
FEATURES = ("g", "h")
SPLITS = ("query", "gallery", "train")
INDEX_KINDS = ("flat", "ivf", "hnsw")
VARIANTS = ("detected", "labeled")


def choices(values: tuple[str, ...]) -> str:
    """The metavar that lists an option's choices in --help: [a|b|c]."""
    return f"[{'|'.join(values)}]"


def check_choice(option: str, value: str | None, values: tuple[str, ...]) -> None:
    """Refuse a value outside `values` (None: not given) as a usage error."""
    if value is not None and value not in values:
        listed = f"{', '.join(values[:-1])} or {values[-1]}"
        raise fail(ValueError(f"{option} {value!r}: choose {listed}"), 2)


# The dataset names `--dataset` takes, for --help (tests/test_cli_help.py holds it to
# reidkit.data.datasets, which is not imported here: --help stays fast).
DATASET_NAMES = (
    "market1501, dukemtmc-reid, cuhk03-np, cuhk03-np-labeled, msmt17, synthetic, or the --name "
    "a custom set was prepared under (short names: market, duke, cuhk03, msmt)"
)

# Options that evaluate and extract share; each defaults to what the checkpoint says.
CheckpointDataRoot = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="where prepared datasets live (default: $REIDKIT_DATA, else the checkpoint's "
        "training root, else ~/data)",
        metavar="FOLDER",
    ),
]
CheckpointFlip = Annotated[
    bool | None,
    typer.Option(
        "--flip/--no-flip",
        help="average with mirrored images; default: the checkpoint's eval.flip",
    ),
]
CheckpointFeature = Annotated[
    str | None,
    typer.Option(
        "--feature",
        help="g: pooled parts (global head: before BNNeck); h: reduced (after it); "
        "default: the checkpoint's eval.feature",
        metavar=choices(FEATURES),
    ),
]


def interrupted(message: str) -> typer.Exit:
    """Ctrl-C: one line saying what was kept, cleaned up and how to go on; exit code 130."""
    err_console.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True)
    return typer.Exit(130)


def command_line(*words: object) -> str:
    """A command the user can paste: words joined, each quoted where the shell needs it."""
    return shlex.join(str(w) for w in words)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON by rename (reidkit.outputs), so no partial file is ever at `path`, with
    reidkit's mark, so a later run may replace it."""
    write_output_text(path, "json", json.dumps(json_with_mark(data), indent=2) + "\n")


def show_version(value: bool) -> None:
    if value:
        from reidkit import __version__

        console.print(f"reidkit {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=show_version, help="print the version and exit"
        ),
    ] = False,
) -> None:
    # no docstring: the app's help stays the one given to typer.Typer above
    pass


@app.command()
def presets(
    keys: Annotated[
        bool,
        typer.Option(
            "--keys", help="list every setting `train --set KEY=VALUE` takes, with its default"
        ),
    ] = False,
) -> None:
    """List the shipped presets with a one-line description each (--keys: the settings)."""
    from reidkit.config import available_presets, preset_description, setting_keys

    if keys:
        title = "settings (reidkit train --set KEY=VALUE; a preset changes some defaults)"
        table = Table(title=title, min_width=len(title))
        for column in ("key", "values", "default"):
            table.add_column(column, style="bold" if column == "key" else None)
        for key, values, default in setting_keys():
            table.add_row(key, values, default or "(empty)")
        console.print(table)
        return
    table = Table(title="presets (reidkit train --preset NAME)")
    table.add_column("name", style="bold")
    table.add_column("description")
    try:
        for name, path in available_presets().items():
            table.add_row(name, preset_description(path))
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    console.print(table)


@app.command()
def prepare(
    dataset: Annotated[
        str,
        typer.Argument(
            help="market1501 | dukemtmc-reid | cuhk03-np | msmt17 | custom | synthetic "
            "(short names: market, duke, cuhk03, msmt)",
            metavar="DATASET",
        ),
    ],
    root: Annotated[
        Path, typer.Argument(help="data root; the dataset goes to ROOT/NAME", metavar="ROOT")
    ],
    source: Annotated[
        Path | None,
        typer.Option(
            help="archive (.zip/.tar/.tar.gz) or folder; default: look in ROOT", metavar="PATH"
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="folder name under ROOT (default: the dataset name)", metavar="NAME"),
    ] = None,
    variant: Annotated[
        str,
        typer.Option(
            help="cuhk03-np boxes: detected (the paper's) or labeled", metavar=choices(VARIANTS)
        ),
    ] = "detected",
    allow_mismatch: Annotated[
        bool, typer.Option(help="accept counts that differ from the published ones")
    ] = False,
    quick_check: Annotated[
        bool,
        typer.Option(
            help="read only each image's header (fast; a truncated image passes); "
            "default: decode every image fully"
        ),
    ] = False,
    check_images: Annotated[
        bool, typer.Option(help="decode every image again, also of an already prepared dataset")
    ] = False,
    seed: Annotated[int, typer.Option(help="synthetic: random seed", metavar="N")] = 0,
    train_ids: Annotated[
        int, typer.Option(help="synthetic: training identities", metavar="N")
    ] = 60,
    test_ids: Annotated[int, typer.Option(help="synthetic: test identities", metavar="N")] = 40,
    cameras: Annotated[int, typer.Option(help="synthetic: cameras (2-6)", metavar="N")] = 4,
) -> None:
    """Verify a dataset against its published counts and write ROOT/NAME/manifest.csv."""
    from reidkit.data.datasets import DATASET_NAMES, canonical_name
    from reidkit.data.prepare import CountMismatchError, prepare_dataset
    from reidkit.data.synthetic import SyntheticSpec

    check_choice("--variant", variant, VARIANTS)
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
            quick_check=quick_check,
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
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    except KeyboardInterrupt:
        again = ["reidkit", "prepare", dataset, root]
        # every option given, so the command makes the same dataset (synthetic: its spec)
        for option, value, default in (
            ("--source", source, None),
            ("--name", name, None),
            ("--variant", variant, "detected"),
            ("--seed", seed, 0),
            ("--train-ids", train_ids, 60),
            ("--test-ids", test_ids, 40),
            ("--cameras", cameras, 4),
        ):
            if value != default:
                again += [option, value]
        again += [flag for flag, on in (("--allow-mismatch", allow_mismatch),
                                        ("--quick-check", quick_check),
                                        ("--check-images", check_images)) if on]  # fmt: skip
        staged = {
            "synthetic": "the images generated so far were removed",
            "custom": "nothing else was written",
        }.get(
            DATASET_NAMES.get(dataset.strip().lower(), ""), "its temporary extraction was removed"
        )
        raise interrupted(
            f"interrupted: no manifest was written, so nothing under {root} is a prepared "
            f"dataset from this run; {staged}; run again with: {command_line(*again)}"
        ) from None
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    table = titled_table(f"{result.name}: {result.manifest}")  # the title is never folded
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
        str | None,
        typer.Option(
            help="preset name (`reidkit presets` lists them) or a .toml file (default: smoke)",
            metavar="NAME|FILE",
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help=f"prepared dataset: {DATASET_NAMES}; default: the preset's", metavar="NAME"
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(
            help="where prepared datasets live (default: $REIDKIT_DATA or ~/data)",
            metavar="FOLDER",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="output folder (default: runs/<preset>-<dataset>/)", metavar="FOLDER"),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="override a setting, e.g. train.epochs=5 or attention.grid=6,4 (repeatable); "
            "`reidkit presets --keys` lists every key with its values and default",
            metavar="KEY=VALUE",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue OUT/last.pt with the run's own settings; --set may change only "
            "train.epochs (to extend it), train.eval_every, data.workers, data.root and "
            "eval.batch_size"
        ),
    ] = False,
) -> None:
    """Train a PCB / PCB-RPP model with attention; writes last.pt, metrics.csv and curves.png."""
    from reidkit.config import load_preset
    from reidkit.data.datasets import dataset_folder
    from reidkit.engine.distributed import is_main_process
    from reidkit.engine.train import default_run_folder, fit, resume_config

    try:
        extra = list(overrides or [])
        if dataset:
            extra.append(f"data.dataset={dataset_folder(dataset)}")
        if data_root:
            extra.append(f"data.root={data_root.expanduser()}")
        if resume:
            # the run's own settings, from its checkpoint; --preset and --dataset only find
            # the default folder, and --set may change only what is safe to change
            if out is None:
                located = [item for item in extra if item.startswith("data.dataset=")]
                out = default_run_folder(load_preset(preset or "smoke", located))
            config = resume_config(out, extra, preset=preset)
        else:
            config = load_preset(preset or "smoke", extra)
        checkpoint = fit(config, out, resume=resume)
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    except Interrupted as err:
        raise interrupted(str(err)) from None
    except KeyboardInterrupt:  # before the first epoch began: nothing was trained
        raise interrupted(
            "interrupted before training began: no checkpoint was written; run the same "
            "command again"
        ) from None
    if is_main_process():
        console.print(f"checkpoint: {checkpoint}")
        console.print(
            f"metrics: {checkpoint.parent / 'metrics.csv'}  curves: "
            f"{checkpoint.parent / 'curves.png'}"
        )


def report_table(report) -> Table:
    """The evaluation table: ours beside the published row when the run compares with it."""
    metrics = report.metrics
    title = (
        f"{report.preset} on {report.dataset}: {report.num_query:,} queries, "
        f"{report.num_gallery:,} gallery images"
    )
    table = titled_table(title)  # as wide as its title: never folded
    table.add_column("")
    for column in ("R1", "R5", "R10", "mAP", "mINP"):
        table.add_column(column, justify="right")
    ranks = [metrics.rank(min(k, len(metrics.cmc))) for k in (1, 5, 10)]
    ours = [*ranks, metrics.mAP, metrics.mINP]
    table.add_row("reidkit", *(f"{100 * v:.1f}" for v in ours), style="bold")
    if report.paper is not None:
        paper = report.paper
        values = (paper.rank1, paper.rank5, paper.rank10, paper.mAP)
        table.add_row(
            paper.source or "paper (Table 1)",
            *("-" if v is None else f"{v:.1f}" for v in values),
            "-",
        )
    return table


def print_report(report) -> None:
    """The table, then the protocol it was computed under, never wrapped mid-phrase."""
    metrics = report.metrics
    console.print(report_table(report))
    if report.paper is None and report.paper_note:
        console.print(f"no reference row: {report.paper_note}", soft_wrap=True, highlight=False)
    unmatched = metrics.num_skipped_queries
    if metrics.ap_mode == "official":  # the official code averages over every query
        queries = (
            f"averaged over all {metrics.num_averaged_queries:,} queries: valid queries "
            f"{metrics.num_valid_queries:,}, {unmatched:,} without a true match scored 0"
        )
    else:
        queries = f"valid queries {metrics.num_valid_queries:,}, skipped {unmatched:,}"
    console.print(
        f"protocol: {report.protocol}; AP mode: {metrics.ap_mode}; "
        f"{queries}; "
        f"feature {report.feature}, flip {'on' if report.flip else 'off'}, "
        f"re-ranking {'on' if report.rerank else 'off'}",
        soft_wrap=True,
        highlight=False,
    )
    if report.chance_rank1 is not None:
        console.print(
            f"chance rank-1 (random ranking): {100 * report.chance_rank1:.1f}%", highlight=False
        )
    if report.gallery:
        console.print(f"gallery ranked in {report.gallery}", highlight=False, soft_wrap=True)


@app.command()
def evaluate(
    checkpoint: Annotated[
        Path, typer.Argument(help="checkpoint written by `reidkit train`", metavar="CHECKPOINT")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help=f"prepared dataset: {DATASET_NAMES}; default: the one it was trained on",
            metavar="NAME",
        ),
    ] = None,
    data_root: CheckpointDataRoot = None,
    flip: CheckpointFlip = None,
    ap_mode: Annotated[
        str | None,
        typer.Option(
            help="torchreid (mean precision at hits) or official (Market trapezoid); "
            "default: the checkpoint's eval.ap_mode",
            metavar=choices(AP_MODES),
        ),
    ] = None,
    rerank: Annotated[
        bool | None,
        typer.Option(
            "--rerank/--no-rerank",
            help="k-reciprocal re-ranking (k1=20, k2=6); default: the checkpoint's eval.rerank",
        ),
    ] = None,
    feature: CheckpointFeature = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the results here", metavar="FILE")
    ] = None,
    cmc_plot: Annotated[
        Path | None, typer.Option(help="write the CMC curve to this PNG", metavar="FILE")
    ] = None,
    gallery: Annotated[
        str | None,
        typer.Option(
            help="rank the gallery `extract` stored here (milvus:PATH.db, milvus:http://HOST:"
            "19530 or an index folder) instead of embedding the dataset's gallery split",
            metavar="FOLDER|URI",
        ),
    ] = None,
    collection: Annotated[
        str | None,
        typer.Option(
            help="Milvus collection of --gallery (default: reidkit_gallery)", metavar="NAME"
        ),
    ] = None,
) -> None:
    """Rank the gallery for every query: R1/R5/R10/mAP/mINP, the published row when comparable."""
    from reidkit.engine.evaluate import run_evaluation
    from reidkit.retrieval.visualize import save_cmc_curve

    check_choice("--ap-mode", ap_mode, AP_MODES)
    check_choice("--feature", feature, FEATURES)
    try:
        if json_out is not None:
            check_output_file("--json", json_out, "json", inputs=[("the checkpoint", checkpoint)])
        if cmc_plot is not None:
            inputs = [("the checkpoint", checkpoint), ("the --json output", json_out)]
            check_output_file("--cmc-plot", cmc_plot, "png", inputs=inputs)
        report = run_evaluation(
            checkpoint,
            dataset,
            root=data_root.expanduser() if data_root else None,
            flip=flip,
            ap_mode=ap_mode,
            rerank=rerank,
            feature=feature,
            gallery=gallery,
            collection=collection,
        )
        print_report(report)
        if json_out is not None:
            with writing("--json", json_out):
                write_json(json_out, report.as_dict())
            console.print(f"results: {json_out}")
        if cmc_plot is not None:
            title = f"{report.preset} on {report.dataset}"
            with writing("--cmc-plot", cmc_plot):
                save_cmc_curve(report.metrics.cmc, cmc_plot, title)
            console.print(f"CMC curve: {cmc_plot}")
    except (ReidkitError, OSError) as err:
        raise fail(err) from None


Collection = Annotated[
    str | None,
    typer.Option(
        help="Milvus collection of the gallery (default: reidkit_gallery)", metavar="NAME"
    ),
]


@app.command()
def extract(
    checkpoint: Annotated[
        Path, typer.Argument(help="checkpoint written by `reidkit train`", metavar="CHECKPOINT")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(help=f"prepared dataset to embed: {DATASET_NAMES}", metavar="NAME"),
    ] = None,
    split: Annotated[
        str, typer.Option(help="the split to embed", metavar=choices(SPLITS))
    ] = "gallery",
    images: Annotated[
        Path | None,
        typer.Option(help="embed every image under this folder instead", metavar="FOLDER"),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="index folder (default: runs/index, where search looks), or milvus:PATH.db "
            "(Milvus Lite) / milvus:http://HOST:19530 (a Milvus server)",
            metavar="FOLDER|URI",
        ),
    ] = None,
    data_root: CheckpointDataRoot = None,
    index: Annotated[
        str | None,
        typer.Option(
            help="flat (exact), ivf or hnsw (approximate, for huge galleries); "
            "default: the checkpoint's eval.index",
            metavar=choices(INDEX_KINDS),
        ),
    ] = None,
    flip: CheckpointFlip = None,
    feature: CheckpointFeature = None,
    collection: Collection = None,
    meta: Annotated[
        Path | None,
        typer.Option(
            help="CSV of path and any of pid, camid, frame, timestamp, for each image",
            metavar="FILE",
        ),
    ] = None,
    shards: Annotated[
        Path | None,
        typer.Option(
            help="folder of the feature shards (default: OUT.shards beside the output)",
            metavar="FOLDER",
        ),
    ] = None,
) -> None:
    """Embed a dataset split or an image folder into a gallery: a FAISS folder or Milvus."""
    from reidkit.engine.search import DEFAULT_INDEX, build_gallery_index, default_shards
    from reidkit.retrieval.milvus import is_milvus

    check_choice("--split", split, SPLITS)
    check_choice("--index", index, INDEX_KINDS)
    check_choice("--feature", feature, FEATURES)
    target = out if out is None or is_milvus(out) else Path(out)
    try:
        result = build_gallery_index(
            checkpoint,
            target or DEFAULT_INDEX,
            dataset=dataset,
            split=split,
            images=images,
            root=data_root.expanduser() if data_root else None,
            index_kind=index,
            flip=flip,
            feature=feature,
            meta_csv=meta,
            collection=collection,
            shards=shards,
        )
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    except KeyboardInterrupt:
        target = target or DEFAULT_INDEX
        again = ["reidkit", "extract", checkpoint]
        if images is not None:
            again += ["--images", images]
        else:
            again += ["--dataset", dataset, "--split", split]
        again += ["--out", target]
        for option, value in (("--data-root", data_root), ("--index", index),
                              ("--feature", feature), ("--collection", collection),
                              ("--meta", meta), ("--shards", shards)):  # fmt: skip
            if value is not None:
                again += [option, value]
        if flip is not None:
            again.append("--flip" if flip else "--no-flip")
        kept = Path(shards or default_shards(target, collection))
        finished = len(list(kept.glob("features-*.npy"))) if kept.is_dir() else 0
        resume = (
            f"the {finished} finished feature shard(s) are kept in {kept}, and the same "
            "command resumes from them"
            if finished
            else "no feature shard was finished"
        )
        raise interrupted(
            f"interrupted: {target} was not written (an index already there is unchanged); "
            f"{resume}; run again with: {command_line(*again)}"
        ) from None
    if result is None:  # another torchrun rank: rank 0 reports
        return
    if result.resumed:
        console.print(
            f"resumed: {result.resumed} of {result.shards} shards were finished by an earlier "
            "run and not embedded again",
            highlight=False,
        )
    console.print(
        f"embedded {result.embedded:,} images in {result.seconds:.1f} s "
        f"({result.images_per_second:,.1f} images/s over {result.world_size} process(es))",
        highlight=False,
    )
    if result.collection is None:
        console.print(f"index: {result.out} (index.faiss, features.npy, meta.csv, info.json)")
    else:
        console.print(
            f"gallery: {result.out} collection {result.collection} ({result.num_images:,} rows)",
            highlight=False,
        )


def print_search(results) -> None:
    for result in results:
        pid = "unknown" if result.query_pid is None else str(result.query_pid)
        table = titled_table(f"{result.query} (pid {pid})")  # as wide as its title
        for column in ("rank", "score", "pid", "camera", "match", "path"):
            table.add_column(column, justify="right" if column in ("rank", "score") else "left")
        for m in result.matches:
            if result.query_pid is None or m.pid < 0:
                verdict = "?"
            else:
                verdict = "[green]yes[/]" if m.pid == result.query_pid else "[red]no[/]"
            pid_text = "?" if m.pid < 0 else str(m.pid)
            camera = "?" if m.camid < 0 else str(m.camid)
            table.add_row(str(m.rank), f"{m.score:.3f}", pid_text, camera, verdict, m.path)
        console.print(table)


@app.command()
def search(
    queries: Annotated[list[Path], typer.Argument(help="query image(s)", metavar="IMAGE...")],
    index: Annotated[
        str | None,
        typer.Option(
            help="gallery from `reidkit extract`: an index folder (default: runs/index) or "
            "milvus:PATH.db / milvus:http://HOST:19530",
            metavar="FOLDER|URI",
        ),
    ] = None,
    top: Annotated[
        int, typer.Option(min=1, help="how many matches to show per query", metavar="N")
    ] = 10,
    save: Annotated[Path, typer.Option(help="ranked montage PNG", metavar="FILE")] = Path(
        "ranked.png"
    ),
    collection: Collection = None,
    camera: Annotated[
        str | None, typer.Option(help="only these cameras: 3,4,5 or 3-5", metavar="LIST")
    ] = None,
    after: Annotated[
        str | None,
        typer.Option(
            help="only from this time on: a frame number or 2024-05-01T10:00 (UTC)",
            metavar="TIME",
        ),
    ] = None,
    before: Annotated[
        str | None,
        typer.Option(help="only before this time (exclusive), as --after", metavar="TIME"),
    ] = None,
    path_prefix: Annotated[
        str | None,
        typer.Option(help="only images whose path starts with this", metavar="PREFIX"),
    ] = None,
) -> None:
    """Find a person: the top matches of each query image, as a table and a montage PNG."""
    from reidkit.engine.search import MONTAGE_COLUMNS, save_results_montage, search_index
    from reidkit.retrieval.filters import filter_from_options
    from reidkit.retrieval.milvus import is_milvus

    try:
        where = filter_from_options(camera, after, before, path_prefix)
        queried = [("the query image", query) for query in queries]
        check_output_file("--save", save, "png", inputs=queried)
        gallery = index if index is None or is_milvus(index) else Path(index)
        results = search_index(queries, gallery, top=top, where=where, collection=collection)
        with writing("--save", save):
            montage = save_results_montage(results, save)
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    print_search(results)
    console.print(f"montage: {montage}")
    shown = max((len(result.matches) for result in results), default=0)
    if shown > MONTAGE_COLUMNS:
        console.print(
            f"the montage shows the top {MONTAGE_COLUMNS} of the {shown:,} matches per query; "
            "the table lists them all",
            highlight=False,
        )


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="folder for data, run, index and pictures", metavar="FOLDER")
    ] = Path("runs/demo"),
) -> None:
    """The whole pipeline on synthetic people, on a CPU: prepare, train, evaluate, search."""
    from reidkit.engine.demo import run_demo

    try:
        check_writable("--out", out, folder=True)
        result = run_demo(out, step=lambda text: console.print(f"[bold]{text}[/]"))
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    print_report(result.report)  # its chance rank-1 line puts the scores in scale
    print_search([result.search])
    # the program as this shell reaches it: bare `reidkit` only in an activated environment
    again = command_line("search", result.search.query, "--index", result.index)
    console.print(
        f"\ncheckpoint  {result.checkpoint}\ncurves      {result.curves_png}\n"
        f"index       {result.index}\nranked      {result.ranked_png}\n"
        f"try: {invoked_as()} {again}"
    )


@app.command()
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="checkpoint written by `reidkit train`", metavar="CHECKPOINT")
    ],
    out: Annotated[Path, typer.Option(help="the ONNX file to write", metavar="FILE")] = Path(
        "model.onnx"
    ),
    check_images: Annotated[
        Path | None,
        typer.Option(
            help="folder of images to check the export on (default: its query split)",
            metavar="FOLDER",
        ),
    ] = None,
) -> None:
    """Write an ONNX model: N x 3 x H x W images -> the checkpoint's unit-length test feature."""
    from reidkit.engine.export import export_onnx

    try:
        with writing("--out", out):  # export_onnx checks --out first, before any work
            report = export_onnx(checkpoint, out, check_images=check_images)
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    for key in ("input", "preprocessing", "feature", "flip", "csalr_solve"):
        if key in report.metadata:
            console.print(f"{key:<14}{report.metadata[key]}", highlight=False)
    if report.min_cosine is None:
        console.print("[yellow]not checked:[/] no images found; give --check-images FOLDER")
    else:
        console.print(
            f"checked       {report.checked_images} images with onnxruntime, worst cosine "
            f"to PyTorch {report.min_cosine:.6f}",
            highlight=False,
        )
    console.print(f"model: {report.path} ({report.seconds:.1f} s)")


@app.command()
def attention(
    checkpoint: Annotated[
        Path, typer.Argument(help="checkpoint of a model with attention", metavar="CHECKPOINT")
    ],
    image: Annotated[Path, typer.Argument(help="a person image", metavar="IMAGE")],
    stage: Annotated[
        int | None,
        typer.Option(
            help="the module after this ResNet stage, 1-4 (default: the first)", metavar="N"
        ),
    ] = None,
    group: Annotated[int, typer.Option(min=0, help="which channel group's map", metavar="N")] = 0,
    point: Annotated[
        list[str] | None,
        typer.Option(
            help="query point y,x in pixels of the resized input, or y%,x% of its height and "
            "width (repeatable; default: head, chest, hips and knees)",
            metavar="Y,X",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="the PNG to write", metavar="FILE")] = Path(
        "attention.png"
    ),
) -> None:
    """The paper's Figure 4: attention maps of query points, CSALR's beside the full map."""
    from reidkit.engine.attention_maps import QueryPoint, attention_maps
    from reidkit.retrieval.visualize import save_attention_figure

    try:
        points = [QueryPoint.parse(text) for text in point] if point else None
    except ValueError as err:
        raise fail(ValueError(f"--point {err}"), 2) from None
    try:
        inputs = [("the checkpoint", checkpoint), ("the image", image)]
        check_output_file("--out", out, "png", inputs=inputs)
        result = attention_maps(checkpoint, image, stage=stage, group=group, points=points)
        title = f"{image.name}: {result.kind} after stage {result.stage}, group {result.group}"
        with writing("--out", out):
            save_attention_figure(
                result.image, result.points, result.maps, out, errors=result.errors, title=title
            )
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    table = Table(title=title, min_width=len(title))  # as wide as its title: never folded
    table.add_column("point")
    table.add_column("map cell (row, column)")
    if result.errors is not None:
        table.add_column("CSALR vs full (total variation)", justify="right")
    for i, cell in enumerate(result.points):
        row = [str(i + 1), f"{cell[0]}, {cell[1]}"]
        if result.errors is not None:
            row.append(f"{result.errors[i]:.4f}")
        table.add_row(*row)
    console.print(table)
    console.print(f"figure: {out}")


@app.command()
def compare(
    runs: Annotated[
        list[Path], typer.Argument(help="run folders written by `reidkit train`", metavar="RUN...")
    ],
    ap_mode: Annotated[
        str,
        typer.Option(
            help="torchreid (mean precision at hits) or official (Market trapezoid), for all runs",
            metavar=choices(AP_MODES),
        ),
    ] = "torchreid",
    out: Annotated[
        Path, typer.Option(help="write OUT.md, OUT.csv and OUT.png (a prefix)", metavar="OUT")
    ] = Path("comparison"),
) -> None:
    """Finished runs side by side: metrics, the published row, epochs, time, images/s, memory."""
    from reidkit.engine.compare import (
        comparison_frame,
        reference_notes,
        run_checkpoint,
        save_comparison_plot,
        save_comparison_tables,
        summarise_run,
    )

    check_choice("--ap-mode", ap_mode, AP_MODES)
    outputs = {suffix: out.with_name(out.name + suffix) for suffix in (".md", ".csv", ".png")}
    try:
        inputs = [("the checkpoint", run_checkpoint(run)) for run in runs]
        for path, kind in zip(outputs.values(), ("markdown", "csv", "png"), strict=True):
            check_output_file("--out", path, kind, inputs=inputs)
        summaries = [summarise_run(run, ap_mode=ap_mode) for run in runs]
        frame = comparison_frame(summaries)
        notes = reference_notes(summaries)
        with writing("--out", outputs[".md"]):
            save_comparison_tables(frame, outputs[".md"], outputs[".csv"], notes)
        with writing("--out", outputs[".png"]):
            save_comparison_plot(summaries, outputs[".png"])
    except (ReidkitError, OSError) as err:
        raise fail(err) from None
    table = Table(title=f"runs compared (AP mode {ap_mode})")
    for column in frame.columns:
        left = column in ("run", "preset", "settings", "dataset")
        table.add_column(str(column), justify="left" if left else "right")
    for row in frame.itertuples(index=False):
        table.add_row(*("" if value is None or value != value else str(value) for value in row))
    console.print(table)
    for note in notes:
        console.print(note, soft_wrap=True, highlight=False)
    console.print(f"written: {', '.join(str(p) for p in outputs.values())}")
