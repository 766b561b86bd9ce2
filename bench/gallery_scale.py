"""A million-image gallery: Milvus Lite and a FAISS IVF-PQ index built out of core, measured.

    nice -n 10 python bench/gallery_scale.py                     # 1,000,000 x 512, ~30 min
    python bench/gallery_scale.py --images 50000 --out /tmp/gs  # a quick look

The gallery is synthetic but shaped like re-ID features: identities seen several times (a
mean of 10 views each: 100,000 identities in a million images), 8 cameras that each pull their
views towards a shared camera direction, and per-view noise, every row unit length. A view's
cosine to another view of its identity is about 0.75 across cameras, to a random row about
0, the picture a trained model gives. Rows carry a pid, a camera and a frame number, so the
filtered searches restrict to cameras 3-5 (3 of 8, 37.5% of the rows).

Width 512: the feature of OSNet, of ResNet-18 / MobileNet global heads and of CLIP-ReID. A
million 512-d float32 rows are 1.9 GiB; Milvus Lite holds them (and its index) in memory,
which must stay well under 12 GiB on this 24 GiB machine shared with training runs. 768-d
would be 2.9 GiB raw with the same copies, and PCB's 12,288-d `g` feature 46 GiB, which is
what `--feature h` (1,536-d) or a global-head model is for at this size.

The steps run in their own processes, one after another, so each one's peak memory (the
maximum resident set size, read from the kernel) is its own; a watchdog ends any step whose
resident memory passes --memory-cap (11 GiB) rather than let it crowd the machine.

1. generate: feature shards of 100,000 rows (.npy, written by rename) and their metadata,
   1,000 queries (new views of gallery identities), and the exact top-10 of every query over
   the whole gallery and over cameras 3-5, by brute force over the shards (the reference).
2. faiss: IVF-PQ (4,096 lists, 64 sub-quantisers of 8 bits: 64 bytes a row) trained on 100,000
   rows drawn from all shards, then filled shard by shard from memory maps, written to disk.
   Queries single-threaded, nprobe 32; filtered ones through a FAISS ID selector (bitmap).
   faiss-nprobe: the same index at nprobe 16-256, alone and with its top 100 re-scored
   exactly from the memory-mapped shards.
3. milvus: reidkit's own Milvus path (`GalleryWriter`, `MilvusGallery`: what `extract --out
   milvus:...` and `search --camera` run), Milvus Lite, `--index ivf` (IVF_FLAT per segment)
   and `--index flat`. One query per call, as `search` sends them.

Recall@10 is the share of the exact top-10 found in the index's top 10, averaged over queries
(approximate search against exact search, not re-ID accuracy). Queries/s are single-threaded
(FAISS and BLAS limited to one thread), one query at a time, on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python bench/gallery_scale.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD_ROWS = 100_000
DIM = 512
VIEWS_PER_ID = 10
CAMERAS = 8
FILTER_CAMERAS = (3, 4, 5)
NUM_QUERIES = 1000
K = 10
SEED = 0


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def watchdog(cap_gib: float) -> None:
    """End this process when its resident memory passes the cap (the machine is shared)."""

    def watch() -> None:
        while True:
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
            if rss / 2**20 > cap_gib:
                print(f"memory cap: resident {rss / 2**20:.1f} GiB > {cap_gib} GiB", flush=True)
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Identities:
    """Identity centres with the low-dimensional structure of learned features, and camera
    directions: people resemble each other by attributes (clothes, build), so centres lie
    near a 64-d subspace, drawn around 256 attribute modes, plus a little in every direction.
    Without that structure (centres spread evenly over the 512-d sphere) no inverted-list
    index finds a view's neighbours in a few lists, which trained models' features do."""

    SUBSPACE, MODES = 64, 256

    def __init__(self, num_ids: int) -> None:
        rng = np.random.default_rng(SEED)
        basis = np.linalg.qr(rng.standard_normal((DIM, self.SUBSPACE)))[0]  # (DIM, 64)
        modes = rng.standard_normal((self.MODES, self.SUBSPACE))
        z = modes[rng.integers(0, self.MODES, num_ids)]
        z += 0.6 * rng.standard_normal((num_ids, self.SUBSPACE))
        spread = rng.standard_normal((num_ids, DIM)) * (0.25 * np.sqrt(self.SUBSPACE / DIM))
        self.centres = unit(z @ basis.T + spread)  # (num_ids, DIM): 200 MB at 100,000
        self.cameras = unit(rng.standard_normal((CAMERAS, DIM)))
        self.num_ids = num_ids

    def views(self, pids: np.ndarray, camids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal((len(pids), DIM)).astype(np.float32) / np.sqrt(DIM)
        return unit(self.centres[pids] + 0.35 * self.cameras[camids] + 0.45 * noise)


def generate(out: Path, num_images: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ids = Identities(max(1, num_images // VIEWS_PER_ID))
    start = time.perf_counter()
    for shard, first in enumerate(range(0, num_images, SHARD_ROWS)):
        rows = min(SHARD_ROWS, num_images - first)
        rng = np.random.default_rng((SEED, 2, shard))
        index = np.arange(first, first + rows)
        pids = index % ids.num_ids  # every identity in every tenth of the rows: views spread
        camids = rng.integers(1, CAMERAS + 1, rows)
        features = ids.views(pids, camids - 1, rng)
        save(out / f"features-{shard:03d}.npy", features)
        save(out / f"meta-{shard:03d}.npy", np.stack([pids, camids, index * 5]).astype(np.int64))
    rng = np.random.default_rng((SEED, 3))
    q_pids = rng.integers(0, ids.num_ids, NUM_QUERIES)
    q_cams = rng.integers(1, CAMERAS + 1, NUM_QUERIES)
    queries = ids.views(q_pids, q_cams - 1, rng)
    save(out / "queries.npy", queries)
    generated = time.perf_counter() - start
    start = time.perf_counter()
    truth = exact_top_k(out, queries, None)
    truth_filtered = exact_top_k(out, queries, FILTER_CAMERAS)
    save(out / "truth.npy", truth)
    save(out / "truth_filtered.npy", truth_filtered)
    save(out / "query_pids.npy", q_pids)
    same = queries[:200] @ ids.views(q_pids[:200], (q_cams[:200] % CAMERAS), rng).T
    return {
        "step": "generate",
        "images": num_images,
        "dim": DIM,
        "seconds_generate": generated,
        "seconds_exact_truth": time.perf_counter() - start,
        "cosine_same_identity_other_camera": float(np.mean(np.diag(same[:200]))),
        "cosine_random_pair": float(np.mean(same[:200, :200][~np.eye(200, dtype=bool)])),
        "peak_gib": peak_gib(),
    }


def save(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp.npy")
    np.save(temporary, array, allow_pickle=False)
    os.replace(temporary, path)


def shards(out: Path) -> list[tuple[Path, Path]]:
    return [(p, p.with_name(p.name.replace("features", "meta")))
            for p in sorted(out.glob("features-*.npy"))]  # fmt: skip


def exact_top_k(out: Path, queries: np.ndarray, cameras: tuple[int, ...] | None) -> np.ndarray:
    """The exact top-K rows of every query over all shards (among `cameras` when given)."""
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), K), -1, dtype=np.int64)
    for features_path, meta_path in shards(out):
        features = np.load(features_path, mmap_mode="r")
        meta = np.load(meta_path)
        scores = queries @ np.asarray(features).T  # (Q, shard)
        if cameras is not None:
            scores[:, ~np.isin(meta[1], cameras)] = -np.inf
        head = np.argpartition(-scores, K, axis=1)[:, :K]  # this shard's top K, unordered
        both_scores = np.concatenate([best_scores, np.take_along_axis(scores, head, 1)], axis=1)
        both_rows = np.concatenate([best_rows, (meta[2] // 5)[head]], axis=1)
        top = np.argsort(-both_scores, axis=1, kind="stable")[:, :K]
        best_scores = np.take_along_axis(both_scores, top, 1)
        best_rows = np.take_along_axis(both_rows, top, 1)
    return best_rows


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def camera_rows(out: Path) -> np.ndarray:
    return np.concatenate([np.isin(np.load(m)[1], FILTER_CAMERAS) for _, m in shards(out)])


def run_faiss(out: Path) -> dict:
    from reidkit.retrieval.index import import_faiss

    faiss = import_faiss()
    num_images = sum(np.load(f, mmap_mode="r").shape[0] for f, _ in shards(out))
    nlist = 4096 if num_images >= 500_000 else max(16, round(4 * np.sqrt(num_images)))
    start = time.perf_counter()
    # train on a sample drawn from every shard, never the whole gallery in memory
    per_shard = 100_000 // len(shards(out))
    rng = np.random.default_rng((SEED, 4))
    parts = []
    for features_path, _ in shards(out):
        features = np.load(features_path, mmap_mode="r")
        take = np.sort(rng.choice(len(features), min(per_shard, len(features)), replace=False))
        parts.append(np.asarray(features[take]))
    sample = np.concatenate(parts)
    del parts
    quantizer = faiss.IndexFlatIP(DIM)
    index = faiss.IndexIVFPQ(quantizer, DIM, nlist, 64, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = SEED
    index.train(sample)
    trained = time.perf_counter() - start
    del sample
    for features_path, _ in shards(out):
        index.add(np.asarray(np.load(features_path, mmap_mode="r")))
    built = time.perf_counter() - start
    path = out / "ivfpq.faiss"
    faiss.write_index(index, str(path))
    faiss.omp_set_num_threads(1)
    index.nprobe = 32
    queries = np.load(out / "queries.npy")
    allowed = camera_rows(out)
    bits = np.packbits(allowed, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
    filtered = faiss.SearchParametersIVF(sel=selector, nprobe=32)
    results = {}
    for name, params, truth in (
        ("unfiltered", None, np.load(out / "truth.npy")),
        ("cameras 3-5", filtered, np.load(out / "truth_filtered.npy")),
    ):
        found = np.empty((len(queries), K), dtype=np.int64)
        start = time.perf_counter()
        for i, query in enumerate(queries):  # one query at a time, as a search command sends
            found[i] = index.search(query[None], K, params=params)[1][0]
        seconds = time.perf_counter() - start
        results[name] = {"recall_at_10": recall(found, truth), "qps": len(queries) / seconds}
    return {
        "step": "faiss",
        "index": f"IVF{nlist},PQ64x8 (nprobe 32)",
        "seconds_train": trained,
        "seconds_build": built,
        "bytes_on_disk": du(path),
        "peak_gib": peak_gib(),
        "search": results,
    }


def run_faiss_nprobe(out: Path) -> dict:
    """The written IVF-PQ index at other nprobe, and with its top 100 re-scored exactly from
    the shards (memory-mapped; the raw rows never all in memory): what recall costs."""
    from reidkit.retrieval.index import import_faiss

    faiss = import_faiss()
    faiss.omp_set_num_threads(1)
    index = faiss.read_index(str(out / "ivfpq.faiss"))
    maps = [np.load(f, mmap_mode="r") for f, _ in shards(out)]
    queries, truth = np.load(out / "queries.npy"), np.load(out / "truth.npy")
    results = []
    for nprobe in (16, 32, 64, 128, 256):
        for refine in (0, 100):
            found = np.empty((len(queries), K), dtype=np.int64)
            start = time.perf_counter()
            for i, query in enumerate(queries):
                params = faiss.SearchParametersIVF(nprobe=nprobe)
                rows = index.search(query[None], refine or K, params=params)[1][0]
                if refine:
                    rows = rows[rows >= 0]
                    exact = np.stack([maps[r // SHARD_ROWS][r % SHARD_ROWS] for r in rows])
                    rows = rows[np.argsort(-(exact @ query), kind="stable")[:K]]
                found[i, : len(rows)] = rows[:K]
            seconds = time.perf_counter() - start
            results.append({
                "nprobe": nprobe, "refine": refine, "recall_at_10": recall(found, truth),
                "qps": len(queries) / seconds,
            })  # fmt: skip
    return {"step": "faiss-nprobe", "peak_gib": peak_gib(), "sweep": results}


def run_milvus(out: Path, kind: str) -> dict:
    import pandas as pd

    from reidkit.retrieval.filters import GalleryFilter
    from reidkit.retrieval.index import import_faiss
    from reidkit.retrieval.milvus import GalleryWriter, MilvusGallery, parse_target

    database = out / f"milvus-{kind}.db"
    shutil.rmtree(database, ignore_errors=True)
    target = parse_target(f"milvus:{database}", "scale")
    num_images = sum(np.load(f, mmap_mode="r").shape[0] for f, _ in shards(out))
    info = {"checkpoint": "synthetic", "checkpoint_sha256": "0" * 64, "feature_kind": "synthetic"}
    start = time.perf_counter()
    with GalleryWriter(
        target, dim=DIM, num_rows=num_images, index_kind=kind, info={**info, "flip": False}
    ) as writer:
        for features_path, meta_path in shards(out):
            pids, camids, frames = np.load(meta_path)
            meta = pd.DataFrame({
                "path": [f"/gallery/cam{c}/{p:06d}_{f:09d}.jpg"
                         for p, c, f in zip(pids, camids, frames, strict=True)],
                "pid": pids, "camid": camids, "frame": frames, "timestamp": -1,
            })  # fmt: skip
            writer.add(np.load(features_path), meta)
        writer.commit()
    built = time.perf_counter() - start
    import_faiss().omp_set_num_threads(1)  # Milvus Lite searches with FAISS in this process
    start = time.perf_counter()
    gallery = MilvusGallery.open(target)
    gallery.search(np.load(out / "queries.npy")[:1], K)  # loads the segments and indexes
    loaded = time.perf_counter() - start
    queries = np.load(out / "queries.npy")[: 200 if kind == "flat" else 1000]
    results = {}
    for name, where, truth in (
        ("unfiltered", None, np.load(out / "truth.npy")),
        ("cameras 3-5", GalleryFilter(cameras=FILTER_CAMERAS), np.load(out / "truth_filtered.npy")),
    ):
        found = np.empty((len(queries), K), dtype=np.int64)
        start = time.perf_counter()
        for i, query in enumerate(queries):
            found[i] = gallery.search(query[None], K, where=where)[1][0]
        seconds = time.perf_counter() - start
        results[name] = {
            "recall_at_10": recall(found, truth[: len(queries)]),
            "qps": len(queries) / seconds,
            "queries": len(queries),
        }
    gallery.close()
    return {
        "step": f"milvus-{kind}",
        "index": f"Milvus Lite {gallery.info['milvus_index']} {gallery.info['search_params']}",
        "seconds_build": built,
        "seconds_open": loaded,
        "bytes_on_disk": du(database),
        "peak_gib": peak_gib(),
        "search": results,
    }


def child(args: argparse.Namespace) -> None:
    watchdog(args.memory_cap)
    if args.step == "generate":
        result = generate(args.out, args.images)
    elif args.step == "faiss":
        result = run_faiss(args.out)
    elif args.step == "faiss-nprobe":
        result = run_faiss_nprobe(args.out)
    else:
        result = run_milvus(args.out, args.step.split("-", 1)[1])
    print("RESULT " + json.dumps(result), flush=True)


def table(results: list[dict], images: int) -> str:
    lines = [
        f"gallery: {images:,} x {DIM} float32 ({images * DIM * 4 / 2**30:.2f} GiB raw); "
        f"filtered = cameras 3-5 ({len(FILTER_CAMERAS)} of {CAMERAS})",
        "",
        "| index | build s | peak GiB | on disk MiB | recall@10 | q/s | recall@10 filtered "
        "| q/s filtered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "search" not in r:
            continue
        plain, filtered = r["search"]["unfiltered"], r["search"]["cameras 3-5"]
        lines.append(
            f"| {r['index']} | {r['seconds_build']:.0f} | {r['peak_gib']:.1f} | "
            f"{r['bytes_on_disk'] / 2**20:,.0f} | {plain['recall_at_10']:.3f} | "
            f"{plain['qps']:,.1f} | {filtered['recall_at_10']:.3f} | {filtered['qps']:,.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/out/gallery_scale"))
    parser.add_argument("--steps", default="generate,faiss,milvus-ivf,milvus-flat,faiss-nprobe")
    parser.add_argument("--memory-cap", type=float, default=11.0, help="GiB per step")
    parser.add_argument("--json", type=Path, help="also write every step's numbers here")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # the child process's one step
    args = parser.parse_args()
    if args.step:
        child(args)
        return
    results = []
    for step in args.steps.split(","):
        command = [sys.executable, __file__, "--step", step, "--out", str(args.out),
                   "--images", str(args.images), "--memory-cap", str(args.memory_cap)]  # fmt: skip
        started = time.perf_counter()
        # Searches are timed on one thread: FAISS, and BLAS inside Milvus Lite's FLAT search.
        threads = {} if step == "generate" else {
            name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        }  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, **threads}
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"step {step} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                  f"{done.stderr[-3000:]}")  # fmt: skip
            sys.exit(1)
        result = json.loads(lines[-1][len("RESULT ") :])
        result["seconds_step"] = time.perf_counter() - started
        print(json.dumps(result), flush=True)
        results.append(result)
    print(table(results, args.images))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
