"""The strong baseline's global head: BNNeck's frozen bias, which feature goes where, wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reidkit.config import load_preset
from reidkit.engine import train as train_module
from reidkit.engine.extract import embed_images
from reidkit.models.global_head import GlobalHead
from reidkit.models.net import build_model
from reidkit.models.pcb import PCBHead

# ResNet-18 at 128x64: stage maps 32x16, 16x8, 8x4 (grid 4,4 divides them), final 8x4.
SMALL = [
    "model.arch=resnet18",
    "model.pretrained=false",
    "data.height=128",
    "data.width=64",
    "attention.grid=4,4",
]


def bot_model(*overrides: str, num_ids: int = 6):
    config = load_preset("bot-csalr", [*SMALL, *overrides])
    torch.manual_seed(0)
    return build_model(config, num_ids), config


def test_model_head_key_builds_the_head_it_names():
    model, _ = bot_model()
    assert isinstance(model.head, GlobalHead) and model.head_kind == "global"
    assert model.head.classifier.bias is None
    pcb, _ = bot_model("model.head=pcb", "model.parts=4")
    assert isinstance(pcb.head, PCBHead) and pcb.head_kind == "pcb"


def test_triplet_feature_is_before_the_bn_and_classifier_reads_after_it():
    model, _ = bot_model()
    model.eval()
    images = torch.randn(3, 3, 128, 64)
    fmap, _ = model.forward_features(images)
    out = model(images)
    pooled = fmap.mean(dim=(2, 3))  # (3, 512)
    torch.testing.assert_close(out.part_features[:, 0], pooled)
    bn = model.head.bn
    after = (pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
    torch.testing.assert_close(out.reduced_features[:, 0], after)
    torch.testing.assert_close(out.part_logits[:, 0], after @ model.head.classifier.weight.T)
    # deep supervision works unchanged: one classifier per CSALR module
    assert len(out.aux_logits) == 3 and out.aux_logits[0].shape == (3, 6)


@pytest.mark.parametrize(("feature", "field"), [("h", "reduced_features"), ("g", "part_features")])
def test_test_feature_is_after_the_bn_by_default_and_before_it_as_an_option(feature, field):
    model, config = bot_model(f"eval.feature={feature}")
    model.eval()
    images = torch.randn(2, 3, 128, 64)
    features = embed_images(model, images, feature=config.eval.feature)
    expected = F.normalize(getattr(model(images), field)[:, 0], dim=1)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_bnneck_bias_stays_exactly_zero_after_optimizer_steps(optimizer):
    model, config = bot_model(f"train.optimizer={optimizer}", "train.lr=0.01")
    opt = train_module._build_optimizer(model, config)
    model.train()
    labels = torch.arange(3).repeat_interleave(2)
    for _ in range(3):
        losses = train_module.reid_loss(
            model(torch.randn(6, 3, 128, 64)), labels, 1.0, label_smoothing=0.1, triplet="hard"
        )
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert not model.head.bn.bias.requires_grad
    assert torch.equal(model.head.bn.bias, torch.zeros_like(model.head.bn.bias))
    assert not torch.equal(model.head.bn.weight, torch.ones_like(model.head.bn.weight))  # trained
    # unfreezing everything (as RPP's second step does) keeps the bias frozen
    model.unfreeze_all()
    assert not model.head.bn.bias.requires_grad
