"""`evaluate` ranks a chunk of queries at a time and refuses re-ranking it cannot hold."""

from __future__ import annotations

import pytest

from reidkit.engine import evaluate as evaluate_module
from reidkit.engine.evaluate import run_evaluation
from reidkit.errors import DatasetError
from reidkit.retrieval import metrics


def test_evaluation_never_builds_the_whole_distance_matrix(monkeypatch, tiny_checkpoint, tiny_spec):
    whole = run_evaluation(tiny_checkpoint, "tiny", progress=False)
    gallery = tiny_spec.counts().gallery_images
    products = []
    original = metrics._QueryBlocks.block

    def recorded(self, start, stop, out):
        products.append(stop - start)
        return original(self, start, stop, out)

    monkeypatch.setattr(metrics._QueryBlocks, "block", recorded)
    monkeypatch.setattr(metrics, "distance_matrix", None)  # evaluation must not need it
    monkeypatch.setattr(metrics, "PRODUCT_ENTRIES", 2 * gallery)
    monkeypatch.setattr(metrics, "CHUNK_ENTRIES", gallery)
    chunked = run_evaluation(tiny_checkpoint, "tiny", progress=False)
    assert products and max(products) == 2  # two queries' distances at a time
    assert sum(products) <= whole.num_query
    assert chunked.metrics.cmc.tolist() == whole.metrics.cmc.tolist()
    assert (chunked.metrics.mAP, chunked.metrics.mINP) == (whole.metrics.mAP, whole.metrics.mINP)


def test_rerank_above_the_pair_limit_is_refused_before_extraction(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(evaluate_module, "RERANK_MAX_PAIRS", 10)
    monkeypatch.setattr(evaluate_module, "extract_features", None)  # not reached
    with pytest.raises(DatasetError) as err:
        run_evaluation(tiny_checkpoint, "tiny", rerank=True, progress=False)
    message = str(err.value)
    assert "re-ranking needs the whole query x gallery distance matrix" in message
    assert "reidkit re-ranks up to 10:" in message and "without --rerank" in message
