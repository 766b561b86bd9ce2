"""Evaluation speed on Market-1501-sized synthetic data: distances, CMC/mAP/mINP, FAISS.

    python bench/evaluation.py --torchreid-source ~/src/deep-person-reid   # or TORCHREID_SOURCE
    python bench/evaluation.py --dims 2048 --repeats 5 --json eval.json

Times (1) the query-gallery distance matrix (reidkit's torch path, and numpy BLAS beside it),
(2) the metric step (distances in -> CMC/mAP/mINP) on three kinds of distance matrix: a strong
model's (true matches near the top), a weak or cross-domain model's (`--weak-noise`: the
hardest true matches thousands of ranks deep) and an "evenly spread" one (each query's true
matches at evenly spaced ranks over the whole gallery, nothing past the hardest match to
skip), each by reidkit's `cmc_map`, by torchreid's compiled evaluation and by a plain
per-query numpy loop; (3) a FAISS flat top-k search alone; (4) features in -> metrics out as
`evaluate` runs it (query chunks).

The peer is torchreid's own `evaluate_cy(..., use_metric_cuhk03=False)` from its public
Cython source, `torchreid/metrics/rank_cylib/rank_cy.pyx` in KaiyangZhou/deep-person-reid:
`--torchreid-source` names that file or a checkout holding it. The bench compiles it with
Cython as torchreid's setup.py does, in a temporary folder, keeps the extension in a cache
folder outside the repository (nothing of torchreid is ever written into it), and checks that
its CMC and mAP equal reidkit's. Without the source or
Cython it says so and times a numpy stand-in instead: the batched argsort and match gather that
`eval_market1501_cy` runs before its compiled loop. The stand-in can be slower or faster than
torchreid itself, so a ratio against it bounds nothing. The per-query loop's numbers must
equal reidkit's exactly (asserted, both AP modes; "agree" is printed). Steps compared in one row
group run in turns, round after round (`--repeats`), and the table, printed last, reports each
one's best: ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as `python bench/evaluation.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import cpu_model, load_average, write_rows_json  # noqa: E402 - after the path set-up

# Market-1501 test split: 750 query identities, 3,368 queries, 15,913 gallery images of which
# 2,793 are distractors (pid 0), 6 cameras.
MARKET_QUERY_IDS = 750
MARKET_DISTRACTOR_FRACTION = 2793 / 15913
CAMERAS = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--dims", default="12288,2048", help="comma-separated feature sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step (best kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--topk", type=int, default=100, help="k of the FAISS search")
    parser.add_argument(
        "--weak-noise",
        type=float,
        default=4.5,
        help="per-image noise of the weak model's features (the strong one's: 2.5)",
    )
    parser.add_argument(
        "--loop-queries",
        type=int,
        default=0,
        help="run the per-query loop on this many queries (evenly spaced) and extrapolate its "
        "time; the agreement check then covers that subset (default: all queries)",
    )
    parser.add_argument(
        "--torchreid-source",
        type=Path,
        default=os.environ.get("TORCHREID_SOURCE") or None,
        help="torchreid's rank_cy.pyx, or a deep-person-reid checkout holding it (default: "
        "$TORCHREID_SOURCE); without it the peer is a numpy stand-in",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    return parser.parse_args(argv)


def market_like_ids(rng, num_q: int, num_g: int):
    """Query/gallery pids and camids shaped like Market-1501's test split."""
    import numpy as np

    num_ids = min(MARKET_QUERY_IDS, num_q)
    # Each identity is queried from up to 6 distinct cameras, as Market's one query per camera.
    per_id = np.full(num_ids, num_q // num_ids)
    per_id[: num_q - per_id.sum()] += 1
    q_pids = np.repeat(np.arange(1, num_ids + 1), per_id)
    q_camids = np.concatenate([rng.permutation(CAMERAS)[: min(c, CAMERAS)] for c in per_id])
    if len(q_camids) < num_q:  # more than 6 queries per identity: cameras repeat
        q_camids = rng.integers(0, CAMERAS, num_q)
    num_distractors = round(num_g * MARKET_DISTRACTOR_FRACTION)
    num_real = num_g - num_distractors
    g_pids = np.concatenate(
        [
            np.arange(1, num_ids + 1)[: min(num_ids, num_real)],  # every identity at least once
            rng.integers(1, num_ids + 1, max(0, num_real - num_ids)),
            np.zeros(num_distractors, dtype=np.int64),
        ]
    )
    g_camids = rng.integers(0, CAMERAS, num_g)
    order = rng.permutation(num_g)
    return q_pids, q_camids, g_pids[order], g_camids[order]


STRONG_NOISE = 2.5


def identity_features(rng, pids, camids, dim: int, noise: float = STRONG_NOISE):
    """L2-normalised identity centroid + camera offset + per-image noise, float32.

    Each distractor (pid 0) is its own identity. The noise grows with the dimension so that
    the difficulty stays similar across feature sizes. On Market's shape, the default noise
    (a strong model) gives about R1 0.99 / mAP 0.8 / mINP 0.25, the median query's hardest
    true match near rank 150; noise 4.5 (a weak or cross-domain model) about R1 0.48 /
    mAP 0.15 / mINP 0.004, the median hardest match near rank 6,600 of 15,913.
    """
    import numpy as np

    unique = pids.copy()
    is_distractor = unique == 0
    unique[is_distractor] = pids.max() + 1 + np.arange(is_distractor.sum())
    _, identity = np.unique(unique, return_inverse=True)
    spread = np.sqrt((1 + noise**2) * np.sqrt(dim / 2048) - 1)
    feats = rng.standard_normal((len(pids), dim), dtype=np.float32)
    feats *= (spread * np.exp(0.3 * rng.standard_normal(len(pids)))).astype(np.float32)[:, None]
    feats += rng.standard_normal((identity.max() + 1, dim), dtype=np.float32)[identity]
    feats += 0.5 * rng.standard_normal((camids.max() + 1, dim), dtype=np.float32)[camids]
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats


def evenly_spread_distances(rng, q_pids, q_camids, g_pids, g_camids):
    """A float32 distance matrix whose true matches sit at evenly spaced ranks of the gallery.

    Each row ranks the gallery in a random order, except that the query's k true matches take
    ranks (j + 1/2) * G / k, j = 0..k-1: the first near rank G / 2k, the hardest near the last.
    Nothing lies past the hardest match, so reidkit has nothing to skip: every entry of every
    row must be counted. The distances are rank / G, all distinct, so the ranking has no ties
    that torchreid's unstable argsort could order differently from reidkit's stable rule.
    """
    import numpy as np

    num_g = len(g_pids)
    distmat = np.empty((len(q_pids), num_g), dtype=np.float32)
    everything = np.arange(num_g)
    for i, (pid, camid) in enumerate(zip(q_pids, q_camids, strict=True)):
        is_match = (g_pids == pid) & (g_camids != camid)
        matches = np.flatnonzero(is_match)
        k = len(matches)
        match_ranks = ((np.arange(k) + 0.5) * num_g / k).astype(np.int64)  # distinct: G >= k
        rank = np.empty(num_g, dtype=np.int64)
        rank[rng.permutation(matches)] = match_ranks
        rank[~is_match] = rng.permutation(np.setdiff1d(everything, match_ranks))
        distmat[i] = rank / num_g
    return distmat


class Peer(NamedTuple):
    """What reidkit's metric step is timed against."""

    name: str  # the step's name in the table
    run: Callable  # (distmat, q_pids, g_pids, q_camids, g_camids) -> (cmc, mAP) or None
    note: str  # how it was obtained, printed above the table


def torchreid_standin(distmat, q_pids, g_pids, q_camids, g_camids):
    """The numpy part of torchreid's compiled `eval_market1501_cy`, before its per-query loop.

    A full batched argsort of every row and the gather of the matches as int64, as torchreid
    writes them; the compiled loop over the sorted rows is not included, and no metrics come
    out (returns None).
    """
    import numpy as np

    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int64)  # timed, not used
    del matches


RANK_CY = Path("torchreid") / "metrics" / "rank_cylib" / "rank_cy.pyx"

# Compiles one .pyx as torchreid's setup.py compiles rank_cy (numpy's headers, setuptools'
# default flags), in a child process: setuptools and the compiler print to the terminal, and
# the bench's own output stays its table.
BUILD_SCRIPT = """
import sys
import numpy
from Cython.Build import cythonize
from setuptools import Extension
from setuptools.dist import Distribution

pyx, build = sys.argv[1], sys.argv[2]
ext = Extension("rank_cy", [pyx], include_dirs=[numpy.get_include()])
dist = Distribution({"ext_modules": cythonize([ext], build_dir=build, quiet=True)})
command = dist.get_command_obj("build_ext")
command.build_lib, command.build_temp = build + "/lib", build + "/temp"
dist.run_command("build_ext")
"""


def peer_cache() -> Path:
    """Where compiled peers are kept between runs: the user's cache, never the repository."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "reidkit-bench"


def build_torchreid(source: Path) -> tuple[Callable | None, str]:
    """torchreid's compiled `evaluate_cy` from its Cython source, or None and the reason why not.

    `source` is `rank_cy.pyx` itself or a deep-person-reid checkout. The build runs in a
    temporary folder and the extension is cached under `peer_cache()`, keyed by the source,
    Python, numpy and Cython versions, so a second run loads it without compiling.
    """
    import numpy as np

    source = Path(source).expanduser()
    pyx = source / RANK_CY if source.is_dir() else source
    if not pyx.is_file():
        return None, f"no torchreid source at {pyx}"
    text = pyx.read_bytes()  # the file first: a wrong file is news whatever is installed
    if b"eval_market1501_cy" not in text:
        return None, f"{pyx} is not torchreid's rank_cy.pyx (no eval_market1501_cy in it)"
    if importlib.util.find_spec("Cython") is None:
        return None, "Cython is not installed (pip install cython)"
    import Cython

    versions = f"{sys.version}|{np.__version__}|{Cython.__version__}".encode()
    key = hashlib.sha256(text + versions).hexdigest()[:16]
    cached = peer_cache() / f"torchreid-rank_cy-{key}"
    built = sorted(cached.glob("rank_cy*.so")) + sorted(cached.glob("rank_cy*.pyd"))
    how = f"compiled from {pyx} (Cython {Cython.__version__}), cached in {cached}"
    if not built:
        with tempfile.TemporaryDirectory(prefix="reidkit-rank_cy-") as work:
            shutil.copy(pyx, Path(work) / "rank_cy.pyx")  # the .c lands here, not beside pyx
            done = subprocess.run(
                [sys.executable, "-c", BUILD_SCRIPT, f"{work}/rank_cy.pyx", work],
                capture_output=True,
                text=True,
            )
            found = sorted(Path(work, "lib").glob("rank_cy*"))
            if done.returncode != 0 or not found:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                return None, f"building {pyx} with Cython failed: {last[0]}"
            cached.mkdir(parents=True, exist_ok=True)
            staged = cached / f".{found[0].name}.part"
            shutil.copy(found[0], staged)
            staged.replace(cached / found[0].name)  # a half-copied extension is never loaded
            built = [cached / found[0].name]
    spec = importlib.util.spec_from_file_location("rank_cy", built[0])
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:  # built for another numpy, or a damaged file in the cache
        return None, f"loading {built[0]} failed ({err}); delete {cached} to rebuild it"
    return module.evaluate_cy, how


def choose_peer(source: Path | None, log) -> Peer:
    """torchreid's compiled evaluation when its source and Cython are at hand, else the stand-in."""
    if source is not None:
        evaluate_cy, how = build_torchreid(source)
        if evaluate_cy is not None:

            def run(distmat, q_pids, g_pids, q_camids, g_camids):
                # max_rank 50 as cmc_map's default; False: the Market-1501 protocol
                return evaluate_cy(distmat, q_pids, g_pids, q_camids, g_camids, 50, False)

            note = f"peer: torchreid's evaluate_cy (use_metric_cuhk03=False), {how}"
            log(note)
            return Peer("torchreid evaluate_cy (compiled)", run, note)
        why = how
    else:
        why = "no --torchreid-source (or TORCHREID_SOURCE) given"
    note = (
        f"peer: NOT torchreid's compiled code ({why}); timing a numpy stand-in (its argsort + "
        "gather only) instead. Give --torchreid-source PATH to rank_cy.pyx to compare the real one"
    )
    log(note)
    return Peer("torchreid stand-in (argsort + gather)", torchreid_standin, note)


def loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """The protocol one query at a time with a full stable argsort: (cmc, AP, official AP, INP).

    CMC, AP and INP average over the queries with a true match; the official AP over all
    queries, one without a true match scoring 0 (as the official Market-1501 code does).
    """
    import numpy as np

    cmcs, aps, official_aps, inps, unmatched = [], [], [], [], 0
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        same_pid = g_pids[order] == q_pids[i]
        keep = ~(same_pid & (g_camids[order] == q_camids[i]))
        hits = same_pid[keep]
        if not hits.any():
            unmatched += 1
            continue
        cmc = np.cumsum(hits)[:max_rank] >= 1
        cmcs.append(np.pad(cmc, (0, max_rank - len(cmc)), mode="edge"))
        rank = np.flatnonzero(hits) + 1
        j = np.arange(1, len(rank) + 1)
        aps.append(np.mean(j / rank))
        previous = np.where(rank > 1, (j - 1) / np.maximum(rank - 1, 1), 1.0)
        official_aps.append(np.mean((previous + j / rank) / 2))
        inps.append(len(rank) / rank[-1])
    return (
        np.mean(cmcs, axis=0),
        float(np.mean(aps)),
        float(np.sum(official_aps) / (len(official_aps) + unmatched)),
        float(np.mean(inps)),
    )


class Timing(NamedTuple):
    wall: float  # best wall-clock seconds
    cpu: float  # best process CPU seconds, all threads: the work, whatever else runs
    runs: list[float]  # every wall time


def best_of(repeats: int, fn) -> tuple[Timing, object]:
    """The best of `repeats` timed calls of fn, and fn's last result."""
    ((timing, result),) = best_in_turns(repeats, {"": fn}).values()
    return timing, result


def best_in_turns(repeats: int, fns: dict) -> dict[str, tuple[Timing, object]]:
    """Each fn timed `repeats` times, the fns taking turns within every round, so that a slow
    spell of the shared machine falls on all of them alike: name -> (best Timing, last result)."""
    walls = {name: [] for name in fns}
    cpus = {name: [] for name in fns}
    results = dict.fromkeys(fns)
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {
        name: (Timing(min(walls[name]), min(cpus[name]), walls[name]), results[name])
        for name in fns
    }


def target_line(rows, peer) -> str:
    """Issue 22's target, judged on the rows this run printed."""
    if not peer.name.startswith("torchreid evaluate_cy"):
        return (
            "target (issue 22): not judged: the peer is the stand-in, not torchreid's compiled loop"
        )
    ratios = {r["step"]: r["ratio"] for r in rows if r["step"].endswith(peer.name)}
    worst = min(ratios, key=ratios.get)
    verdict = "met" if ratios[worst] >= 3 else "MISSED"
    return (
        f"target (issue 22): reidkit's metric step >= 3x faster than torchreid's compiled "
        f"evaluate_cy on every distribution: {verdict} (least: {ratios[worst]:.1f}x, {worst})"
    )


# torchreid sums AP and CMC in float32 (per query and over the queries), reidkit in float64;
# agreement is to float32's rounding over a few thousand queries.
PEER_CMC_TOLERANCE = 1e-6
PEER_MAP_TOLERANCE = 1e-5


def compare_metric_steps(args, peer, label, dim, distmat, ids, rows, log):
    """reidkit's metric step beside the peer and the per-query loop, in turns."""
    import numpy as np

    from reidkit.retrieval.metrics import cmc_map

    q_pids, q_camids, g_pids, g_camids = ids
    nq = len(q_pids)
    protocol = (q_pids, g_pids, q_camids, g_camids)
    subset = np.arange(nq)
    if 0 < args.loop_queries < nq:
        subset = np.linspace(0, nq - 1, args.loop_queries).round().astype(int)
    sub = (q_pids[subset], g_pids, q_camids[subset], g_camids)
    sub_distmat = np.ascontiguousarray(distmat[subset])
    mine, theirs, loop = (
        f"metric step, {label}: {what}"
        for what in (
            "reidkit cmc_map (CMC+mAP+mINP)",
            peer.name,
            "per-query numpy loop (full argsort)",
        )
    )
    timed = best_in_turns(
        args.repeats,
        {
            mine: lambda: cmc_map(distmat, *protocol),
            theirs: lambda: peer.run(distmat, *protocol),
        },
    )
    timed |= best_in_turns(1, {loop: lambda: loop_reference(sub_distmat, *sub)})
    scale = nq / len(subset)
    t_loop = timed[loop][0]
    t_loop = Timing(t_loop.wall * scale, t_loop.cpu * scale, [t_loop.wall * scale])
    note = "" if len(subset) == nq else f"timed on {len(subset)} queries, scaled to {nq}"
    t_mine, metrics = timed[mine]
    for step, timing, step_note in (
        (mine, t_mine, ""),
        (theirs, timed[theirs][0], ""),
        (loop, t_loop, note),
    ):
        ratio = None if step == mine else timing.wall / t_mine.wall
        rows.append(
            {"dim": dim, "step": step, **timing._asdict(), "note": step_note, "ratio": ratio}
        )
        runs = [round(t, 3) for t in timing.runs]
        log(f"{step}: best {timing.wall:.3f} s (CPU {timing.cpu:.3f} s) of {runs}")

    # Agreement with torchreid's own numbers, on every query (the stand-in computes none).
    peer_result = timed[theirs][1]
    if peer_result is not None:
        peer_cmc, peer_map = peer_result
        cmc_gap = float(np.max(np.abs(np.asarray(peer_cmc, dtype=np.float64) - metrics.cmc)))
        map_gap = abs(float(peer_map) - metrics.mAP)
        assert cmc_gap <= PEER_CMC_TOLERANCE and map_gap <= PEER_MAP_TOLERANCE, (
            f"{label}: reidkit and torchreid disagree: CMC by {cmc_gap:.2e}, mAP by {map_gap:.2e}"
        )
        log(
            f"{label}: agree: reidkit == torchreid evaluate_cy on all queries (CMC within "
            f"{cmc_gap:.1e}, mAP within {map_gap:.1e}: float32 rounding)"
        )
    # Agreement on exactly the queries the loop saw, both AP conventions.
    loop_cmc, loop_ap, loop_official, loop_inp = timed[loop][1]
    same = metrics if len(subset) == nq else cmc_map(sub_distmat, *sub)
    official = cmc_map(sub_distmat, *sub, ap_mode="official")
    np.testing.assert_allclose(same.cmc, loop_cmc, rtol=0, atol=1e-12)
    assert abs(same.mAP - loop_ap) < 1e-12 and abs(official.mAP - loop_official) < 1e-12
    assert abs(same.mINP - loop_inp) < 1e-12
    scope = "all" if len(subset) == nq else f"{len(subset)} of {nq}"
    log(
        f"{label}: agree: reidkit == per-query loop on {scope} queries "
        f"(R1 {100 * same.rank(1):.2f}, mAP {100 * same.mAP:.2f}, official mAP "
        f"{100 * official.mAP:.2f}, mINP {100 * same.mINP:.2f})"
    )
    return metrics, t_mine


def hardest_match_depth(distmat, ids) -> str:
    """The median and 90th percentile rank of each query's hardest true match."""
    import numpy as np

    from reidkit.retrieval.metrics import match_ranks

    q_pids, q_camids, g_pids, g_camids = ids
    ranked = match_ranks(distmat, q_pids, g_pids, q_camids, g_camids)
    valid = ranked.counts > 0
    last = ranked.ranks[(ranked.offsets + ranked.counts - 1)[valid]]
    median, tail = np.median(last), np.quantile(last, 0.9)
    return f"hardest match at rank {median:.0f} (median), {tail:.0f} (90th percentile)"


def run_dim(args, peer, dim, ids, rng, rows, log):
    import numpy as np

    from reidkit.retrieval.index import import_faiss
    from reidkit.retrieval.metrics import cmc_map_from_features, distance_matrix

    q_pids, q_camids, g_pids, g_camids = ids
    nq = len(q_pids)
    start = time.perf_counter()
    feats = identity_features(rng, np.concatenate([q_pids, g_pids]), np.r_[q_camids, g_camids], dim)
    q_feats, g_feats = feats[:nq], feats[nq:]
    log(f"[{dim}-d] features generated in {time.perf_counter() - start:.1f} s")

    def add(step: str, timing: Timing, note: str = "", ratio=None) -> None:
        rows.append({"dim": dim, "step": step, **timing._asdict(), "note": note, "ratio": ratio})
        runs = [round(t, 3) for t in timing.runs]
        log(f"[{dim}-d] {step}: best {timing.wall:.3f} s (CPU {timing.cpu:.3f} s) of {runs}")

    # (1) distances: reidkit (torch.mm into the output, float32), then numpy's BLAS.
    timed = best_in_turns(
        args.repeats,
        {
            "reidkit": lambda: distance_matrix(q_feats, g_feats),
            "numpy": lambda: 1.0 - q_feats @ g_feats.T,
        },
    )
    (t_dist, distmat), (t_np, np_dist) = timed["reidkit"], timed["numpy"]
    add("distance matrix, reidkit (torch.mm, float32)", t_dist)
    add("distance matrix, numpy BLAS (q @ g.T)", t_np, ratio=t_np.wall / t_dist.wall)
    assert np_dist.dtype == np.float32
    np.testing.assert_allclose(distmat[:64], np_dist[:64], atol=1e-5)
    del np_dist, timed

    # (2) the metric step on a strong model's distances.
    log(f"[{dim}-d] strong model: {hardest_match_depth(distmat, ids)}")
    metrics, _ = compare_metric_steps(args, peer, "strong", dim, distmat, ids, rows, log)

    # (3) FAISS flat inner-product search alone (the add is not timed).
    faiss = import_faiss()
    index = faiss.IndexFlatIP(dim)
    index.add(g_feats)
    t_faiss, (_, found) = best_of(args.repeats, lambda: index.search(q_feats, args.topk))
    add(f"FAISS IndexFlatIP search, top-{args.topk}", t_faiss)
    # Its top-1 is the distance matrix's nearest neighbour (up to float ties).
    top1 = np.argmin(distmat, axis=1)
    agree = np.mean(found[:, 0] == top1)
    log(f"[{dim}-d] FAISS top-1 equals the distance matrix's nearest in {100 * agree:.2f}%")
    del distmat  # evaluation below never holds the whole matrix

    # (4) what `evaluate` runs: query chunks, distances then ranks, never the whole matrix.
    protocol = (q_pids, g_pids, q_camids, g_camids)
    t_total, chunked = best_of(
        args.repeats, lambda: cmc_map_from_features(q_feats, g_feats, *protocol)
    )
    add("features in -> metrics out (cmc_map_from_features)", t_total)
    np.testing.assert_array_equal(chunked.cmc, metrics.cmc)
    assert chunked.mAP == metrics.mAP and chunked.mINP == metrics.mINP
    return metrics


def run_weak(args, peer, ids, rng, rows, log) -> None:
    """The metric step on a weak or cross-domain model's distances (2,048-d features)."""
    import numpy as np

    from reidkit.retrieval.metrics import distance_matrix

    q_pids, q_camids, g_pids, g_camids = ids
    dim = 2048
    feats = identity_features(
        rng, np.concatenate([q_pids, g_pids]), np.r_[q_camids, g_camids], dim, args.weak_noise
    )
    distmat = distance_matrix(feats[: len(q_pids)], feats[len(q_pids) :])
    del feats
    log(f"[weak] noise {args.weak_noise}: {hardest_match_depth(distmat, ids)}")
    compare_metric_steps(args, peer, "weak", dim, distmat, ids, rows, log)


def run_even(args, peer, ids, rng, rows, log) -> None:
    """The metric step when every query's true matches are spread evenly over the ranking."""
    q_pids, q_camids, g_pids, g_camids = ids
    start = time.perf_counter()
    distmat = evenly_spread_distances(rng, q_pids, q_camids, g_pids, g_camids)
    log(f"[even] distances generated in {time.perf_counter() - start:.1f} s")
    log(f"[even] {hardest_match_depth(distmat, ids)}")
    compare_metric_steps(args, peer, "even", "-", distmat, ids, rows, log)


def print_table(rows, args, header_lines) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reidkit evaluation benchmark (best of {args.repeats} runs)")
    table.add_column("dim", justify="right")
    table.add_column("step")
    table.add_column("wall s", justify="right")
    table.add_column("CPU s", justify="right")
    table.add_column("vs reidkit", justify="right")
    table.add_column("note")
    for row in rows:
        ratio = row.get("ratio")
        table.add_row(
            str(row["dim"]),
            row["step"],
            f"{row['wall']:.3f}",
            f"{row['cpu']:.3f}",
            "" if ratio is None else f"{ratio:.1f}x slower" if ratio >= 1 else f"{ratio:.2f}x",
            row.get("note", ""),
        )
    console = Console(width=140)  # a readable table in logs and pipes too
    for line in header_lines:
        console.print(line, highlight=False)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Thread counts must be fixed before numpy / torch / faiss load their thread pools.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    # Idle OpenMP threads sleep instead of spinning: on shared cores a spinning thread takes
    # time from the working ones, and its spin would be billed to the next step's CPU time.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    from reidkit.retrieval.index import import_faiss

    faiss = import_faiss()  # as reidkit loads it (pins OpenBLAS's kernel family; see there)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    dims = [int(d) for d in args.dims.split(",") if d.strip()]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    peer = choose_peer(args.torchreid_source, log)
    rng = np.random.default_rng(args.seed)
    ids = market_like_ids(rng, args.queries, args.gallery)
    header = [
        f"{args.queries} queries x {args.gallery} gallery, dims {dims}, {args.threads} threads; "
        f"torch {torch.__version__}, numpy {np.__version__}, faiss {faiss.__version__}, "
        f"{cpu_model()}, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}",
        peer.note,
        f"load average at start: {load_average()}",
    ]
    log(header[0])
    rows: list[dict] = []
    for dim in dims:
        run_dim(args, peer, dim, ids, rng, rows, log)
    run_weak(args, peer, ids, rng, rows, log)
    run_even(args, peer, ids, rng, rows, log)
    header.append(f"load average at end: {load_average()}")
    header.append(
        "wall s: best elapsed time; CPU s: process CPU time of that step, all threads (other "
        "processes inflate wall time, not CPU time; spinning BLAS threads inflate both)"
    )
    header.append(target_line(rows, peer))
    if args.json:
        write_rows_json(args.json, header, vars(args), rows)
    print_table(rows, args, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
