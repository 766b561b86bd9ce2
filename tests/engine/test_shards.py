"""Extraction in shards: contiguous shares per rank, atomic shards, resume, refusal of another
run's shards, and two gloo processes under torchrun merging to the single-process features."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reidkit.data.loading import build_loader
from reidkit.engine import shards as shards_module
from reidkit.engine.checkpoint import Checkpoint, load_model, save_checkpoint
from reidkit.engine.extract import extract_features
from reidkit.engine.search import build_gallery_index, folder_images
from reidkit.engine.shards import ShardError, ShardFolder, ShardRun, rank_share, shard_bounds
from reidkit.models.net import build_model
from reidkit.retrieval.index import load_index_folder
from reidkit.retrieval.milvus import MilvusGallery, parse_target

RUN = ShardRun("c" * 64, "g", False, "d" * 64, 10)


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory) -> Path:
    """A built, untrained model without attention: extraction is the point, not the model."""
    config = tiny_config("attention.kind=none")
    path = tmp_path_factory.mktemp("shards") / "last.pt"
    save_checkpoint(path, Checkpoint(config, build_model(config, 8).state_dict(), 8, 0, "pcb"))
    return path


@pytest.fixture(scope="module")
def pictures(tiny_root, tmp_path_factory) -> Path:
    """Six gallery images of the tiny set in a folder: a handful is enough for shards."""
    folder = tmp_path_factory.mktemp("pictures")
    for source in sorted((tiny_root / "tiny" / "bounding_box_test").iterdir())[:6]:
        shutil.copy(source, folder / source.name)
    return folder


def folder_features(checkpoint: Path, folder: Path) -> tuple[list[str], np.ndarray]:
    """The images embedded in one process, in one piece: what the shards must add up to."""
    model, state = load_model(checkpoint)
    rows = folder_images(folder)
    loader = build_loader(rows, "gallery", state.config.data, batch_size=16, train=False)
    return list(rows["path"]), extract_features(model, loader, progress=False)


def test_ranks_take_contiguous_runs_of_blocks_that_cover_the_list():
    bounds = shard_bounds(10, 3)
    assert bounds == [(0, 3), (3, 6), (6, 9), (9, 10)]
    shares = [rank_share(bounds, rank, 3) for rank in range(3)]
    assert shares == [[(0, 3)], [(3, 6)], [(6, 9), (9, 10)]]
    assert [rank_share(bounds, rank, 8) for rank in range(8)].count([]) == 4  # more ranks


def test_a_folder_of_another_run_is_refused_naming_what_differs(tmp_path: Path):
    folder = ShardFolder.prepare(tmp_path / "s", RUN, 4)
    folder.write(0, 4, np.ones((4, 3), np.float32))
    for other, words in [
        (ShardRun("e" * 64, "g", False, "d" * 64, 10), "another checkpoint"),
        (ShardRun("c" * 64, "h", False, "d" * 64, 10), "feature g, not h"),
        (ShardRun("c" * 64, "g", False, "f" * 64, 10), "another image list"),
        (ShardRun("c" * 64, "g", True, "d" * 64, 12), "10 images, not 12"),
    ]:
        with pytest.raises(ShardError, match=f"holds shards of another extraction \\({words}\\)"):
            ShardFolder.prepare(tmp_path / "s", other, 4)
    assert ShardFolder.prepare(tmp_path / "s", RUN, 99).shard_size == 4  # the folder's own size
    assert ShardFolder(tmp_path / "s", RUN, 4).finished() == [(0, 4)]


def test_a_folder_of_other_files_is_refused_and_removal_keeps_them(tmp_path: Path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ShardError, match="is a folder of other files"):
        ShardFolder.prepare(tmp_path, RUN, 4)
    folder = ShardFolder.prepare(tmp_path / "s", RUN, 4)
    folder.write(4, 8, np.ones((4, 3), np.float32))
    (tmp_path / "s" / "notes.txt").write_text("keep")  # a user's file, put there later
    folder.remove()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["notes.txt"]


def test_an_interrupted_extraction_resumes_from_its_finished_shards(
    checkpoint, pictures, tmp_path: Path, monkeypatch
):
    out, shards = tmp_path / "index", tmp_path / "index.shards"
    writes = []
    real_write = ShardFolder.write

    def interrupt_third(self, start, stop, features):
        if len(writes) == 2:
            raise KeyboardInterrupt
        writes.append((start, stop))
        real_write(self, start, stop, features)

    monkeypatch.setattr(ShardFolder, "write", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        build_gallery_index(checkpoint, out, images=pictures, shard_size=2, progress=False)
    assert not out.exists()
    kept = sorted(p.name for p in shards.iterdir())
    assert kept == ["features-000000000000-000000000002.npy",
                    "features-000000000002-000000000004.npy", "shards.json"]  # fmt: skip

    # another feature kind is another extraction: refused, the shards kept
    with pytest.raises(ShardError, match="feature g, not h"):
        build_gallery_index(checkpoint, out, images=pictures, feature="h", progress=False)
    assert sorted(p.name for p in shards.iterdir()) == kept

    monkeypatch.setattr(ShardFolder, "write", real_write)
    embedded = []
    real_extract = shards_module.extract_features

    def counting(model, loader, **kwargs):
        features = real_extract(model, loader, **kwargs)
        embedded.append(len(features))
        return features

    monkeypatch.setattr(shards_module, "extract_features", counting)
    result = build_gallery_index(checkpoint, out, images=pictures, progress=False)
    paths, features = folder_features(checkpoint, pictures)
    assert (result.resumed, result.shards, result.embedded) == (2, 3, 2)
    assert embedded == [2]  # only the unfinished shard was embedded again
    loaded = load_index_folder(out)
    assert list(loaded.meta["path"]) == paths
    np.testing.assert_allclose(loaded.features, features, rtol=0, atol=1e-6)
    assert not shards.exists()  # removed once the gallery was written


# Runs `reidkit` under torchrun with ShardFolder.write wrapped to record which rank wrote
# which rows: the real launcher, CLI and extraction.
PROBE = """
import os
import sys
from pathlib import Path

from reidkit.cli import app
from reidkit.engine import shards

record = Path(sys.argv.pop(1))
write = shards.ShardFolder.write


def recorded(self, start, stop, features):
    with open(record / f"rank{os.environ['RANK']}.txt", "a") as handle:
        handle.write(f"{start} {stop}\\n")
    write(self, start, stop, features)


shards.ShardFolder.write = recorded
app(prog_name="reidkit")
"""


def test_two_gloo_processes_embed_halves_and_merge_to_the_single_process_features(
    checkpoint, pictures, tmp_path: Path
):
    record = tmp_path / "record"
    record.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    database = tmp_path / "g.db"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        str(script), str(record), "extract", str(checkpoint), "--images", str(pictures),
        "--out", f"milvus:{database}", "--collection", "tiny",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    paths, features = folder_features(checkpoint, pictures)
    half = (len(paths) + 1) // 2  # shards of ceil(N / 2): one per rank
    assert (record / "rank0.txt").read_text() == f"0 {half}\n"
    assert (record / "rank1.txt").read_text() == f"{half} {len(paths)}\n"
    assert result.stdout.count("over 2 process(es)") == 1  # rank 0 alone reports
    assert f"embedded {len(paths)} images" in result.stdout
    assert not (tmp_path / "g.db.shards").exists()

    gallery = MilvusGallery.open(parse_target(f"milvus:{database}", "tiny"))
    assert list(gallery.rows_meta(np.arange(len(paths)))["path"]) == paths  # rows in order
    scores, rows = gallery.search(features, len(paths))
    # each row's own feature is its best match with score 1: the stored vectors are those
    # the single process computed, row for row
    assert (rows[:, 0] == np.arange(len(paths))).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    sims = features @ features.T
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1), atol=1e-5)
