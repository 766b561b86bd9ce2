"""ReidNet: deep supervision, gradients for every kind, parameter groups, RPP freezing,
recomputation and build_model (ResNet-18 at 128x64 to stay fast on a 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reidkit.config import RunConfig, apply_overrides
from reidkit.errors import CheckpointError, ConfigError
from reidkit.models import imagenet
from reidkit.models import net as net_module
from reidkit.models.attention import build_attention
from reidkit.models.net import NetOutput, ReidNet, build_model
from reidkit.models.pcb import PCBHead, RefinedPartPooling, StripePooling
from reidkit.models.resnet import resnet18

NUM_IDS = 5
KINDS = ["none", "sa", "csa", "csalr"]
# ResNet-18, last stride 1, 128x64 input: stage maps 32x16, 16x8, 8x4, 8x4. A 4x4 landmark
# grid divides all of them; 4 parts of 2 rows each.
HEIGHT, WIDTH, PARTS = 128, 64, 4


def make_net(
    kind: str = "csalr",
    stages: tuple[int, ...] = (1, 2, 3),
    *,
    deep_supervision: bool = True,
    recompute: bool = False,
) -> ReidNet:
    trunk = resnet18(last_stride=1)
    attention = {}
    options = {"sa": {}, "csa": {"bases": 8}, "csalr": {"grid": (4, 4)}}.get(kind, {})
    if kind != "none":
        attention = {
            s: build_attention(kind, trunk.out_channels[s - 1], groups=2, qk_ratio=0.25, **options)
            for s in stages
        }
    head = PCBHead(512, parts=PARTS, reduced=32, num_ids=NUM_IDS)
    return ReidNet(
        trunk, head, attention=attention, deep_supervision=deep_supervision, recompute=recompute
    )


def images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))


PIDS = torch.tensor([0, 1, 2, 3])


def total_loss(out: NetOutput, pids: torch.Tensor = PIDS) -> torch.Tensor:
    """L_F (sum of the part cross-entropies) + sum of the deep-supervision losses (eq. 18)."""
    parts = sum(F.cross_entropy(out.part_logits[:, p], pids) for p in range(PARTS))
    return parts + sum(F.cross_entropy(aux, pids) for aux in out.aux_logits)


def test_output_fields_and_shapes_are_the_same_in_train_and_eval():
    net = make_net("csalr")
    for mode in (True, False):
        net.train(mode)
        out = net(images())
        assert type(out) is NetOutput
        assert out.part_features.shape == (4, PARTS, 512)
        assert out.reduced_features.shape == (4, PARTS, 32)
        assert out.part_logits.shape == (4, PARTS, NUM_IDS)
        assert len(out.aux_logits) == 3
        assert all(a.shape == (4, NUM_IDS) for a in out.aux_logits)


def test_deep_supervision_is_fc_of_gap_of_input_times_fused():
    net = make_net("csalr", stages=(2,)).eval()
    with torch.no_grad():
        # alpha != 0: the module changes the main path, so the two paths can be told apart.
        net.attention["2"].alpha.fill_(0.3)
        x = net.trunk.layer2(net.trunk.layer1(net.trunk.stem(images())))
        out, fused = net.attention["2"](x)
        expected = net.aux_classifiers["2"]((x * fused).mean(dim=(2, 3)))
        got = net(images())
        assert len(got.aux_logits) == 1
        torch.testing.assert_close(got.aux_logits[0], expected)
        # ... and the main path continues from the gated residual `out`, not from `fused`.
        fmap = net.trunk.layer4(net.trunk.layer3(out))
        torch.testing.assert_close(got.part_logits, net.head(fmap).part_logits)


def test_no_attention_gives_no_aux_logits_and_no_aux_branches():
    net = make_net("none")
    assert len(net.attention) == 0 and len(net.aux_classifiers) == 0
    assert net(images()).aux_logits == ()


def test_attention_without_deep_supervision_gives_no_aux_logits():
    net = make_net("csalr", deep_supervision=False)
    assert len(net.attention) == 3 and len(net.aux_classifiers) == 0
    assert net(images()).aux_logits == ()


def test_attention_after_stage_4_is_allowed_and_stage_5_is_refused():
    net = make_net("csalr", stages=(4,))
    assert net.aux_classifiers["4"].in_features == 512
    assert len(net(images()).aux_logits) == 1
    with pytest.raises(ConfigError, match="5"):
        ReidNet(resnet18(), PCBHead(512, num_ids=3), attention={5: torch.nn.Identity()})


def test_trunk_fc_is_dropped_so_no_parameter_is_dead():
    net = make_net("none")
    assert not any(k.startswith("trunk.fc.") for k in net.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_gets_a_gradient_with_deep_supervision(kind):
    torch.manual_seed(0)
    net = make_net(kind)
    total_loss(net(images())).backward()
    # alpha starts at 0, so Q/K/V/fuse get nothing through the residual; deep supervision
    # (which multiplies the input with `fused`) is what reaches them at initialisation.
    zero = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert zero == []


def test_without_deep_supervision_attention_convs_learn_only_once_alpha_moves():
    torch.manual_seed(0)
    net = make_net("csalr", stages=(2,), deep_supervision=False)
    module = net.attention["2"]
    total_loss(net(images())).backward()
    # out = x + alpha * fused with alpha = 0: fused has no path to the loss.
    assert module.alpha.grad.abs() > 0
    for name in ("query", "key", "value", "fuse"):
        assert getattr(module, name).weight.grad.abs().sum() == 0, name
    net.zero_grad()
    with torch.no_grad():
        module.alpha.fill_(0.1)  # the nudge one SGD step on alpha gives
    total_loss(net(images())).backward()
    for name in ("query", "key", "value", "fuse"):
        assert getattr(module, name).weight.grad.abs().sum() > 0, name


def test_parameter_groups_cover_every_parameter_exactly_once():
    net = make_net("csa")
    net.convert_to_rpp()
    groups = net.parameter_groups()
    assert set(groups) == {"trunk", "attention", "new"}
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters()}
    assert {id(p) for p in groups["trunk"]} == {id(p) for p in net.trunk.parameters()}
    assert {id(p) for p in groups["attention"]} == {id(p) for p in net.attention.parameters()}
    assert id(net.attention["1"].alpha) in {id(p) for p in groups["attention"]}
    assert id(net.attention["1"].bases) in {id(p) for p in groups["attention"]}
    new = {id(p) for p in groups["new"]}
    for module in (net.aux_classifiers, net.head, net.head.pooling.classifier):
        assert {id(p) for p in module.parameters()} <= new


def test_freezing_for_rpp_trains_only_the_part_classifier():
    net = make_net("csalr")
    with pytest.raises(ConfigError, match="convert_to_rpp"):
        net.freeze_all_but_part_classifier()
    part_classifier = net.convert_to_rpp().classifier
    net.freeze_all_but_part_classifier()
    net.train()
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["head.pooling.classifier.weight", "head.pooling.classifier.bias"]
    # Frozen means fixed: BN statistics do not move and dropout is off even in train().
    buffers = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    assert not net.head.dropout.training and not net.trunk.bn1.training
    assert part_classifier.training and net.training
    total_loss(net(images())).backward()
    for key, value in buffers.items():
        assert torch.equal(net.state_dict()[key], value), key
    assert part_classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in net.named_parameters() if "pooling" not in n)
    # Frozen in train() gives the same part features as eval().
    with torch.no_grad():
        train_out = net(images()).part_features
        eval_out = net.eval()(images()).part_features
    torch.testing.assert_close(train_out, eval_out)

    net.unfreeze_all()
    net.train()
    assert all(p.requires_grad for p in net.parameters())
    assert net.trunk.bn1.training and net.head.dropout.training


def test_recompute_gives_the_same_gradients(monkeypatch):
    calls = []
    real_checkpoint = net_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(net_module, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    net = make_net("csalr")
    with torch.no_grad():
        for module in net.attention.values():
            module.alpha.fill_(0.2)  # attention on the main path too, not only in DS

    def gradients(recompute: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        net.recompute = recompute
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same dropout masks in both runs
        loss = total_loss(net(images()))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    plain_loss, plain = gradients(False)
    assert calls == []
    recomputed_loss, recomputed = gradients(True)
    assert calls == [False, False, False]  # every module, non-reentrant
    torch.testing.assert_close(recomputed_loss, plain_loss)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, msg=name)
    # No recomputation outside training.
    calls.clear()
    net.eval()(images())
    assert calls == []


def saved_activation_bytes(net: ReidNet) -> int:
    """Bytes of the distinct tensors autograd keeps from one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(images())
    return sum(storages.values())


@pytest.mark.parametrize("projection", ["map", "landmarks"])
def test_recompute_keeps_only_each_modules_output(projection):
    # With recomputation the attention modules add to what autograd keeps only their output
    # `out` (the next stage's input) and the pooled deep-supervision features: neither the
    # deep-supervision product, nor the gated residual, nor anything inside the modules.
    torch.manual_seed(0)
    plain = make_net("none").train()
    baseline = saved_activation_bytes(plain)
    net = make_net("csalr", recompute=True).train()
    for module in net.attention.values():
        module.projection = projection
    maps = [(64, 32, 16), (128, 16, 8), (256, 8, 4)]  # ResNet-18 stages 1-3 at 128x64
    outputs = sum(4 * c * h * w * 4 for c, h, w in maps)  # float32, batch 4
    pooled = sum(4 * c * 4 for c, _, _ in maps)
    recomputed = saved_activation_bytes(net) - baseline
    assert outputs <= recomputed <= outputs + 2 * pooled
    net.recompute = False
    assert saved_activation_bytes(net) - baseline > 2 * outputs  # the modules' activations


def test_deep_supervision_of_any_module_that_returns_out_and_fused():
    # Any module whose forward returns (out, fused) works, not only reidkit's own.
    class Doubling(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fused = 2 * x
            return x + self.alpha * fused, fused

    trunk = resnet18(last_stride=1)
    net = ReidNet(trunk, PCBHead(512, parts=PARTS, num_ids=NUM_IDS), attention={2: Doubling()})
    net.eval()
    with torch.no_grad():
        x = net.trunk.layer2(net.trunk.layer1(net.trunk.stem(images())))
        expected = net.aux_classifiers["2"]((x * 2 * x).mean(dim=(2, 3)))
        torch.testing.assert_close(net(images()).aux_logits[0], expected)


# ---- build_model -----------------------------------------------------------------------------


def config(*overrides: str) -> RunConfig:
    small = ["model.arch=resnet18", "model.pretrained=false", "data.height=192", "data.width=64"]
    return apply_overrides(RunConfig(), [*small, "attention.grid=6,4", *overrides])


def small_images() -> torch.Tensor:
    return torch.randn(2, 3, 192, 64)


def test_build_model_default_is_pcb_with_three_supervised_csalr_modules():
    net = build_model(config(), num_ids=11)
    assert net.attention_stages == (1, 2, 3)
    assert [type(m).__name__ for m in net.attention.values()] == ["CSALR"] * 3
    assert net.attention["1"].grid == (6, 4) and net.attention["1"].groups == 2
    assert isinstance(net.head.pooling, StripePooling)
    assert (net.head.parts, net.head.reduced, net.head.num_ids) == (6, 256, 11)
    assert net.trunk.layer4[0].conv1.stride == (1, 1)
    out = net.eval()(small_images())
    assert out.part_logits.shape == (2, 6, 11) and len(out.aux_logits) == 3


def test_build_model_honours_kind_stages_head_and_options():
    assert build_model(config("attention.kind=none"), 3)(small_images()).aux_logits == ()
    one = build_model(config("attention.stages=1"), 3)
    assert one.attention_stages == (1,) and len(one.eval()(small_images()).aux_logits) == 1
    rpp = build_model(config("model.head=rpp", "train.rpp_epochs=5"), 3)
    assert isinstance(rpp.head.pooling, RefinedPartPooling)
    opts = build_model(
        config("attention.kind=csa", "attention.bases=16", "model.parts=3", "model.reduced=64"), 3
    )
    assert opts.attention["2"].bases.shape[1] == 16
    assert (opts.head.parts, opts.head.reduced) == (3, 64)
    # ResNet-18's BasicBlock strides its first 3x3 conv (conv1), as torchvision's does
    assert build_model(config("model.last_stride=2"), 3).trunk.layer4[0].conv1.stride == (2, 2)
    no_ds = build_model(config("attention.deep_supervision=false"), 3)
    assert len(no_ds.aux_classifiers) == 0 and len(no_ds.attention) == 3
    assert build_model(config("attention.recompute=true"), 3).recompute
    weighted = build_model(config("attention.landmark_weight=2"), 3)
    assert {m.landmark_weight for m in weighted.attention.values()} == {2.0}


def test_build_model_loads_imagenet_weights_into_the_trunk(tmp_path):
    source = resnet18()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    cfg = config("model.pretrained=true", f"model.weights={tmp_path / 'r18.pth'}")
    net = build_model(cfg, 3)
    assert torch.equal(net.trunk.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(net.trunk.bn1.running_mean, source.bn1.running_mean)


def test_build_model_pretrained_offline_without_file_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(imagenet, "fetch_weights", lambda url, destination: False)
    with pytest.raises(CheckpointError) as info:
        build_model(config("model.pretrained=true"), 3)
    message = str(info.value)
    assert "\n" not in message
    assert "resnet18-f37072fd.pth" in message and str(Path(tmp_path) / "checkpoints") in message
