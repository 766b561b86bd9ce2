"""Attention cores against the literal references, the paper's approximation claim, modules."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from reidkit.engine.train import landmark_condition_bound
from reidkit.errors import ConfigError
from reidkit.models import attention
from reidkit.models.attention import (
    ATTENTION,
    CSA,
    CSALR,
    SelfAttention,
    build_attention,
    csa_attention,
    csalr_attention,
    full_attention,
    full_attention_materialised,
)
from reidkit.models.reference import (
    csa_attention_map,
    csa_attention_reference,
    csalr_attention_map,
    csalr_attention_reference,
    csalr_blocks,
    full_attention_map,
    full_attention_reference,
)

# The maps after ResNet stages 1-3 for a 384x128 input (strides 4, 8 and 16).
STAGES = [(96, 32), (48, 16), (24, 8)]
GRIDS = [(6, 4), (12, 8), (24, 8)]
GROUPS = [1, 2, 4, 8]
D, E = 2, 3  # q/k and v channels per group: few, to keep the big maps cheap


def field(
    shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, smooth: float
) -> Tensor:
    """Unit-variance random maps ``(..., H, W)``: ``smooth`` of the variance is low-frequency.

    The smooth part is coarse noise (one cell per 4 x 4 pixels) upsampled bilinearly; the rest
    is white noise. A smooth part keeps the pooled landmarks from averaging out to zero, so
    every softmax in CSALR sees logits of the intended size.
    """
    *lead, h, w = shape
    cells = (max(h // 4, 1), max(w // 4, 1))
    coarse = torch.randn(math.prod(lead), 1, *cells, generator=gen, dtype=dtype)  # (N, 1, h/4, w/4)
    low = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)  # (N, 1, H, W)
    low = (low - low.mean(dim=(2, 3), keepdim=True)) / low.std(dim=(2, 3), keepdim=True)
    white = torch.randn(low.shape, generator=gen, dtype=dtype)  # (N, 1, H, W)
    return (smooth**0.5 * low + (1 - smooth) ** 0.5 * white).view(shape)


def random_qkv(
    b: int,
    g: int,
    hw: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    d: int = D,
    e: int = E,
    logit_std: float = 2.0,
    smooth: float = 0.7,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k ``(b, g, d, H, W)`` and v ``(b, g, e, H, W)`` with ``q_i . k_j`` of std ~logit_std.

    Logits of std 2 keep each softmax row far from uniform and far from one-hot, so a wrong
    index or a missing term shows up in the result.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = (logit_std / d**0.5) ** 0.5  # unit-variance channels: q.k has std sqrt(d) * scale^2
    q = scale * field((b, g, d, *hw), gen, dtype, smooth)
    k = scale * field((b, g, d, *hw), gen, dtype, smooth)
    v = field((b, g, e, *hw), gen, dtype, smooth)
    return q, k, v


def rel_err(a: Tensor, b: Tensor) -> float:
    """Relative error ``|a - b| / |b|`` in the Frobenius norm, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def values_and_grads(fn, inputs: tuple[Tensor, ...], grad_out: Tensor) -> list[Tensor]:
    """``fn(*inputs)`` and the gradients of ``<fn(*inputs), grad_out>`` w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, grad_out)
    return [y.detach(), *grads]


def batch_for(hw: tuple[int, int]) -> int:
    """Two images where the map is small (batch and group folding get exercised), else one."""
    return 2 if hw[0] * hw[1] <= 24 * 8 else 1


# ------------------------------------------------------------------------------------------
# CSALR core
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("hw", STAGES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_csalr_matches_reference_float64_values_and_grads(hw, grid, groups):
    b = batch_for(hw)
    q, k, v = random_qkv(b, groups, hw, seed=groups)
    grad_out = torch.randn(b, groups, E, *hw, dtype=torch.float64)
    fast = values_and_grads(lambda q, k, v: csalr_attention(q, k, v, grid), (q, k, v), grad_out)
    ref = values_and_grads(
        lambda q, k, v: csalr_attention_reference(q, k, v, grid), (q, k, v), grad_out
    )
    for name, a, r in zip(("y", "dq", "dk", "dv"), fast, ref, strict=True):
        assert rel_err(a, r) < 1e-10, name


def test_csalr_float32_agrees_with_float64_reference():
    q, k, v = random_qkv(2, 2, (48, 16), seed=3)
    grad_out = torch.randn(2, 2, E, 48, 16, dtype=torch.float64)
    ref = values_and_grads(
        lambda q, k, v: csalr_attention_reference(q, k, v, (12, 8)), (q, k, v), grad_out
    )
    fast = values_and_grads(
        lambda q, k, v: csalr_attention(q, k, v, (12, 8)),
        (q.float(), k.float(), v.float()),
        grad_out.float(),
    )
    for name, a, r in zip(("y", "dq", "dk", "dv"), fast, ref, strict=True):
        assert a.dtype == torch.float32
        assert rel_err(a, r) < 1e-5, name


def test_csalr_core_equals_its_reconstructed_map_applied_to_v():
    # Ties the re-associated core to the literal n x n map W B (eq. 14): Y = (W B) V.
    q, k, v = random_qkv(2, 2, (24, 8), seed=4)
    attn = csalr_attention_map(q, k, (6, 4))  # (B, G, n, n)
    expected = torch.einsum("bgij,bgej->bgei", attn, v.flatten(3)).unflatten(-1, (24, 8))
    assert rel_err(csalr_attention(q, k, v, (6, 4)), expected) < 1e-12


@pytest.mark.parametrize("grid", [(3, 2), (6, 4), (12, 8), (24, 8)], ids=str)
def test_every_row_of_the_reconstructed_map_sums_to_one(grid):
    # B 1 = 1, A_nm 1 = A_mm 1 = 2 * 1, hence A_nm A_mm^{-1} B 1 = 1.
    q, k, _ = random_qkv(2, 2, (24, 8), seed=5, logit_std=3.0)
    rows = csalr_attention_map(q, k, grid).sum(dim=-1)  # (B, G, n)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-12)


def test_csalr_is_exact_when_every_position_is_its_own_landmark():
    # m = n: P = I, so A_nm = A_mm and W = I; the reconstruction is the full map itself.
    q, k, v = random_qkv(2, 2, (24, 8), seed=6)
    full = full_attention_map(q, k)
    assert rel_err(csalr_attention_map(q, k, (24, 8)), full) < 1e-12
    assert rel_err(csalr_attention(q, k, v, (24, 8)), full_attention_reference(q, k, v)) < 1e-12


def test_csalr_error_falls_as_landmarks_grow_on_smooth_maps():
    """The paper's claim (section 3.2): spatial redundancy lets few landmarks rebuild A_nn.

    On smooth random feature maps the mean per-row total-variation distance between the
    reconstructed and the full attention map falls as the grid refines: 24, 48, 96, 192
    landmarks on a 96x32 map, averaged over three seeds.
    """
    grids = [(6, 4), (12, 4), (12, 8), (24, 8)]
    errors = torch.zeros(len(grids))
    for seed in range(3):
        q, k, _ = random_qkv(1, 1, (96, 32), dtype=torch.float32, seed=seed, d=8, smooth=1.0)
        full = full_attention_map(q, k)  # (1, 1, n, n)
        assert full.amax(dim=-1).mean() > 10 / full.shape[-1]  # far from uniform rows
        for i, grid in enumerate(grids):
            approx = csalr_attention_map(q, k, grid)
            errors[i] += (approx - full).abs().sum(dim=-1).mean() / 2 / 3
    assert all(errors[i] > errors[i + 1] for i in range(len(grids) - 1)), errors
    assert errors[-1] < 0.75 * errors[0], errors


@pytest.mark.parametrize(
    ("hw", "grid"), [((96, 32), (5, 4)), ((48, 16), (12, 5)), ((24, 8), (48, 8))], ids=str
)
def test_grid_that_does_not_divide_the_map_is_refused(hw, grid):
    q, k, v = random_qkv(1, 1, hw)
    pattern = rf"{grid[0]}x{grid[1]}.*{hw[0]}x{hw[1]}"
    with pytest.raises(ConfigError, match=pattern):
        csalr_attention(q, k, v, grid)
    with pytest.raises(ConfigError, match=pattern):
        csalr_attention_reference(q, k, v, grid)


def test_csalr_under_bfloat16_autocast_solves_in_float32(monkeypatch):
    solve_dtypes = []
    solve = torch.linalg.solve

    def spy(a, b, *args, **kwargs):
        solve_dtypes.append((a.dtype, b.dtype))
        return solve(a, b, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve", spy)
    q, k, v = (t.float().requires_grad_() for t in random_qkv(2, 2, (48, 16), seed=7))
    expected = csalr_attention(q, k, v, (12, 8)).detach()
    solve_dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = csalr_attention(q, k, v, (12, 8))
    assert solve_dtypes == [(torch.float32, torch.float32)]
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-7)
    y.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


# ------------------------------------------------------------------------------------------
# Full SA core
# ------------------------------------------------------------------------------------------

# The n x n reference at 96x32 costs 75 MB per group in float64: one group, SDPA only, there.
FULL_CASES = [(full_attention, (96, 32), 1)] + [
    (core, hw, g)
    for core in (full_attention, full_attention_materialised)
    for hw in STAGES[1:]
    for g in GROUPS
]


def case_id(value) -> str:
    """A case's name by the core's name, not its address (xdist's workers must agree)."""
    return getattr(value, "__name__", str(value))


@pytest.mark.parametrize(("core", "hw", "groups"), FULL_CASES, ids=case_id)
def test_full_attention_matches_reference_float64_values_and_grads(core, hw, groups):
    # full_attention zero-pads q and k from d=2 to e=3 channels for the CPU flash kernel: the
    # padding must not change a single logit.
    b = batch_for(hw)
    q, k, v = random_qkv(b, groups, hw, seed=groups)
    grad_out = torch.randn(b, groups, E, *hw, dtype=torch.float64)
    fast = values_and_grads(core, (q, k, v), grad_out)
    ref = values_and_grads(full_attention_reference, (q, k, v), grad_out)
    for name, a, r in zip(("y", "dq", "dk", "dv"), fast, ref, strict=True):
        assert rel_err(a, r) < 1e-10, name


@pytest.mark.parametrize("core", [full_attention, full_attention_materialised])
def test_full_attention_float32_agrees_with_float64_reference(core):
    q, k, v = random_qkv(2, 2, (48, 16), seed=8)
    grad_out = torch.randn(2, 2, E, 48, 16, dtype=torch.float64)
    ref = values_and_grads(full_attention_reference, (q, k, v), grad_out)
    fast = values_and_grads(core, (q.float(), k.float(), v.float()), grad_out.float())
    for name, a, r in zip(("y", "dq", "dk", "dv"), fast, ref, strict=True):
        assert rel_err(a, r) < 1e-5, name


@pytest.mark.parametrize(("d", "e"), [(2, 6), (6, 2), (4, 4)])
def test_full_attention_layout_runs_on_the_cpu_flash_kernel(d, e):
    # Pinning the flash backend raises "No available kernel" if the layout would make SDPA fall
    # back to the math kernel (unequal head widths, or a strided last dimension).
    q, k, v = random_qkv(2, 2, (24, 8), dtype=torch.float32, d=d, e=e)
    q.requires_grad_()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        y = full_attention(q, k, v)
        y.sum().backward()
    assert y.shape == (2, 2, e, 24, 8)
    assert rel_err(y.detach(), full_attention_reference(q.detach(), k, v)) < 1e-5


# ------------------------------------------------------------------------------------------
# CSA core
# ------------------------------------------------------------------------------------------


def csa_inputs(b: int, groups: int, hw: tuple[int, int], *, seed: int, bases: int = 5):
    """CSA's q ``(b, G d, H, W)`` (all of Q), v ``(b, G, e, H, W)``, bases ``(G, m, G d)``."""
    q, _, v = random_qkv(b, groups, hw, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return q.flatten(1, 2), v, torch.randn(groups, bases, groups * D, dtype=q.dtype, generator=gen)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("hw", STAGES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_csa_matches_reference_float64_values_and_grads(hw, groups):
    b = batch_for(hw)
    q, v, bases = csa_inputs(b, groups, hw, seed=groups)
    grad_out = torch.randn(b, groups, E, *hw, dtype=torch.float64)
    fast = values_and_grads(csa_attention, (q, v, bases), grad_out)
    ref = values_and_grads(csa_attention_reference, (q, v, bases), grad_out)
    for name, a, r in zip(("y", "dq", "dv", "dbases"), fast, ref, strict=True):
        assert rel_err(a, r) < 1e-10, name


def test_csa_float32_agrees_with_float64_reference():
    q, v, bases = csa_inputs(2, 2, (48, 16), seed=9, bases=32)
    grad_out = torch.randn(2, 2, E, 48, 16, dtype=torch.float64)
    ref = values_and_grads(csa_attention_reference, (q, v, bases), grad_out)
    fast = values_and_grads(csa_attention, (q.float(), v.float(), bases.float()), grad_out.float())
    for name, a, r in zip(("y", "dq", "dv", "dbases"), fast, ref, strict=True):
        assert rel_err(a, r) < 1e-5, name


def test_csa_by_hand_two_positions_two_bases():
    # q_0 = b_0 and q_1 = b_1, orthonormal: S = 14 I. Both softmaxes give [[p, 1-p], [1-p, p]]
    # with p = sigmoid(14); E = Ab v = [p, 1-p] for v = [1, 0]; Y_i = sum_k Wc_ki E_k.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # (C', n)
    q = q.view(1, 2, 1, 2)  # (B, C', H, W)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 1, 2)  # (B, G, e, H, W)
    bases = torch.eye(2, dtype=torch.float64).view(1, 2, 2)  # (G, m, C')
    p = torch.sigmoid(torch.tensor(14.0, dtype=torch.float64))
    expected = torch.stack([p * p + (1 - p) * (1 - p), 2 * p * (1 - p)]).view(1, 1, 1, 1, 2)
    for core in (csa_attention, csa_attention_reference):
        torch.testing.assert_close(core(3 * q, v, 0.5 * bases), expected)  # cosines: scale-free


def test_csa_bases_of_every_group_compare_against_all_query_channels():
    # The authors' final CSA: group 0's output moves when only the channels a per-group split
    # would give group 1 change.
    q, v, bases = csa_inputs(1, 2, (8, 4), seed=13)
    moved = q.clone()
    moved[:, D:] += torch.randn_like(moved[:, D:])  # the second group's chunk of Q only
    assert rel_err(csa_attention(moved, v, bases)[:, 0], csa_attention(q, v, bases)[:, 0]) > 1e-2


def test_csa_core_equals_its_map_applied_to_v():
    q, v, bases = csa_inputs(2, 2, (24, 8), seed=10)
    attn = csa_attention_map(q, bases)  # (B, G, n, n)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 192, dtype=torch.float64))
    expected = torch.einsum("bgij,bgej->bgei", attn, v.flatten(3)).unflatten(-1, (24, 8))
    assert rel_err(csa_attention(q, v, bases), expected) < 1e-12


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------

C = 16  # module channels: qk_ratio 0.25 gives C' = 4, divisible by 1, 2 and 4 groups


def make(kind: str, channels: int = C, **kw) -> torch.nn.Module:
    options = {"sa": {}, "csa": {"bases": 6}, "csalr": {"grid": (4, 2)}}[kind]
    return ATTENTION[kind](channels, **{**options, **kw}).double()


def image(b: int = 2, c: int = C, hw: tuple[int, int] = (8, 4), seed: int = 0) -> Tensor:
    return torch.randn(b, c, *hw, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_alpha_is_a_zero_initialised_scalar_parameter(kind):
    module = make(kind)
    assert isinstance(module.alpha, torch.nn.Parameter)
    assert module.alpha.shape == () and module.alpha.item() == 0.0
    assert any(p is module.alpha for p in module.parameters())


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_alpha_zero_leaves_the_input_unchanged_exactly(kind):
    module = make(kind)
    x = image()
    out, fused = module(x)
    assert torch.equal(out, x)
    assert fused.abs().max() > 0  # the attention did compute something; the gate held it back


@pytest.mark.parametrize("kind", list(ATTENTION))
@pytest.mark.parametrize("training", [True, False])
def test_forward_returns_out_and_fused_in_train_and_eval(kind, training):
    module = make(kind).train(training)
    with torch.no_grad():
        module.alpha.fill_(0.5)
    x = image(b=3, hw=(8, 6))
    result = module(x)
    assert isinstance(result, tuple) and len(result) == 2
    out, fused = result
    assert out.shape == fused.shape == x.shape
    torch.testing.assert_close(out, x + 0.5 * fused)


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_gradients_reach_every_parameter_once_alpha_is_nonzero(kind):
    module = make(kind)
    with torch.no_grad():
        module.alpha.fill_(0.5)
    x = image().requires_grad_()
    out, _ = module(x)
    out.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_attention_map_is_the_map_the_module_applies(kind):
    # fuse(map @ value(x)) must be the module's `fused`: the map is the one actually used.
    module = make(kind, groups=2)
    x = image()
    attn = module.attention_map(x)  # (B, G, n, n)
    assert attn.shape == (2, 2, 32, 32)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 32, dtype=torch.float64))
    v = module.value(x).unflatten(1, (2, -1)).flatten(3)  # (B, G, C/G, n)
    y = torch.einsum("bgij,bgej->bgei", attn, v).flatten(1, 2).unflatten(-1, (8, 4))
    torch.testing.assert_close(module(x)[1], module.fuse(y))


def test_groups_are_contiguous_channel_chunks():
    module = make("sa", groups=2)
    with torch.no_grad():
        module.alpha.fill_(1.0)
    x = image()
    q, k, v = module.query(x), module.key(x), module.value(x)
    halves = [
        full_attention_reference(
            q[:, None, s * 2 : (s + 1) * 2],
            k[:, None, s * 2 : (s + 1) * 2],
            v[:, None, s * 8 : (s + 1) * 8],
        )[:, 0]
        for s in range(2)
    ]
    torch.testing.assert_close(module(x)[1], module.fuse(torch.cat(halves, dim=1)))


def test_csalr_module_with_a_landmark_per_position_equals_the_sa_module():
    # Same parameter names, so SA can load CSALR's weights; with m = n CSALR is exact.
    csalr = make("csalr", groups=2, grid=(8, 4))
    with torch.no_grad():
        csalr.alpha.fill_(0.7)
    sa = make("sa", groups=2)
    sa.load_state_dict(csalr.state_dict())
    x = image()
    for a, b in zip(csalr(x), sa(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_materialised_sa_module_equals_the_sdpa_one():
    sdpa = make("sa", groups=4)
    with torch.no_grad():
        sdpa.alpha.fill_(0.3)
    materialised = make("sa", groups=4, materialise=True)
    materialised.load_state_dict(sdpa.state_dict())
    x = image()
    torch.testing.assert_close(sdpa(x)[0], materialised(x)[0], rtol=1e-10, atol=1e-12)


def test_csa_bases_are_orthonormal_within_each_group():
    module = CSA(64, groups=2, bases=8)  # C' = 16: 8 x 16, rows orthonormal
    assert module.bases.shape == (2, 8, 16)
    for group in module.bases.detach():
        torch.testing.assert_close(group @ group.T, torch.eye(8), atol=1e-5, rtol=0)
    tall = CSA(32, groups=2, bases=32)  # C' = 8 < m = 32: columns orthonormal
    for group in tall.bases.detach():
        torch.testing.assert_close(group.T @ group, torch.eye(8), atol=1e-5, rtol=0)


def test_csalr_module_refuses_a_grid_that_does_not_divide_its_input():
    module = make("csalr", grid=(3, 2))
    with pytest.raises(ConfigError, match="3x2.*8x4"):
        module(image(hw=(8, 4)))


@pytest.mark.parametrize("cls", [SelfAttention, CSA, CSALR])
@pytest.mark.parametrize(
    ("channels", "groups", "qk_ratio"),
    [(30, 4, 0.25), (64, 3, 0.25), (24, 8, 0.25), (64, 2, 0.0), (64, 0, 0.25)],
)
def test_channels_that_do_not_split_into_groups_are_refused(cls, channels, groups, qk_ratio):
    with pytest.raises(ConfigError, match=cls.__name__):
        cls(channels, groups=groups, qk_ratio=qk_ratio)


def test_build_attention_passes_the_options_to_the_class():
    sa = build_attention("sa", 32, groups=2, qk_ratio=0.5)
    csa = build_attention("csa", 32, groups=2, qk_ratio=0.5, bases=8)
    csalr = build_attention("csalr", 32, groups=2, qk_ratio=0.5, grid=(4, 4), projection="map")
    assert type(sa) is SelfAttention and sa.groups == 2 and sa.query.out_channels == 16
    assert type(csa) is CSA and csa.bases.shape == (2, 8, 16) and csa.key is None
    assert type(csalr) is CSALR and csalr.grid == (4, 4) and csalr.key.out_channels == 16
    assert csalr.projection == "map"


@pytest.mark.parametrize(("kind", "option"), [("sa", "grid"), ("sa", "bases"), ("csa", "grid")])
def test_build_attention_refuses_an_option_the_module_does_not_take(kind, option):
    with pytest.raises(ConfigError, match=rf"{kind}.*takes no {option}; its options: .*groups"):
        build_attention(kind, 32, **{option: 4})


def test_build_attention_keeps_class_defaults_for_unset_options():
    assert build_attention("sa", 32).groups == 1
    module = build_attention("csalr", 32, groups=4)
    assert module.groups == 4 and module.grid == (12, 8) and module.projection == "landmarks"


def test_build_attention_refuses_an_unknown_kind_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'nope'.*sa, csa, csalr"):
        build_attention("nope", 32)
    with pytest.raises(ConfigError, match="sa, csa, csalr"):
        build_attention("none", 32)  # "none" is the network's to handle, not a module


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("channels", "grid"), [(256, (6, 4)), (1024, (12, 8))])
def test_csalr_landmark_matrix_starts_well_conditioned(seed, channels, grid):
    """Large, smooth, post-ReLU maps (as a trained trunk gives) at stage-3 size 24x8.

    At PyTorch's default Q/K scale these gave condition numbers from 14 up to millions; the
    module's initial scale keeps A_mm near I + 11^T/m, whose condition number is 2.
    """
    torch.manual_seed(seed)
    module = CSALR(channels, groups=2, grid=grid)
    coarse = torch.randn(2, channels, 6, 2)
    x = 3 * F.relu(F.interpolate(coarse, size=(24, 8), mode="bilinear") + 0.5)  # (2, C, 24, 8)
    q = module.query(x).unflatten(1, (2, -1)).flatten(0, 1)  # (B*G, d, 24, 8)
    k = module.key(x).unflatten(1, (2, -1)).flatten(0, 1)  # (B*G, d, 24, 8)
    patch = (24 // grid[0], 8 // grid[1])
    q_land = F.avg_pool2d(q, patch).flatten(2)  # (B*G, d, m)
    k_land = F.avg_pool2d(k, patch).flatten(2)  # (B*G, d, m)
    a_mm = (q_land.transpose(1, 2) @ k_land).softmax(-1) + torch.eye(q_land.shape[-1])
    assert torch.linalg.cond(a_mm).max() < 3


# ------------------------------------------------------------------------------------------
# CSALR with value and fuse on the landmark rows
# ------------------------------------------------------------------------------------------


def reference_fused(module: CSALR, x: Tensor) -> Tensor:
    """fuse(CSALR(q, k, value(x))) from plain convs and the naive float64 reference core."""
    q = module.query(x).unflatten(1, (module.groups, -1))  # (B, G, d, H, W)
    k = module.key(x).unflatten(1, (module.groups, -1))  # (B, G, d, H, W)
    v = module.value(x).unflatten(1, (module.groups, -1))  # (B, G, e, H, W)
    y = csalr_attention_reference(q, k, v, module.grid, landmark_weight=module.landmark_weight)
    return module.fuse(y.flatten(1, 2))


def module_values_and_grads(module, fn, x: Tensor, grad: Tensor) -> list[Tensor]:
    """fn(module, x) and the gradients of <fn, grad> w.r.t. x and every parameter."""
    x = x.detach().clone().requires_grad_()
    params = list(module.parameters())
    y = fn(module, x)
    return [y.detach(), *torch.autograd.grad(y, [x, *params], grad, allow_unused=True)]


@pytest.mark.parametrize(
    ("channels", "groups", "grid", "hw"),
    [
        (16, 1, (4, 2), (8, 4)),
        (16, 2, (4, 2), (8, 4)),
        (32, 4, (2, 2), (8, 8)),
        (16, 2, (8, 4), (8, 4)),
    ],
    ids=str,
)
@pytest.mark.parametrize("projection", ["map", "landmarks"])
@pytest.mark.parametrize("weight", [1.0, 2.0], ids=lambda c: f"c={c:g}")
def test_both_projections_match_the_reference_float64(
    channels, groups, grid, hw, projection, weight
):
    torch.manual_seed(groups)
    module = CSALR(
        channels, groups=groups, grid=grid, projection=projection, landmark_weight=weight
    ).double()
    with torch.no_grad():  # logits of a few units: softmaxes far from uniform
        module.query.weight.mul_(10)
        module.key.weight.mul_(10)
    x = torch.randn(3, channels, *hw, dtype=torch.float64)
    grad = torch.randn(3, channels, *hw, dtype=torch.float64)
    fast = module_values_and_grads(module, lambda m, x: m.fused_output(x), x, grad)
    ref = module_values_and_grads(module, reference_fused, x, grad)
    names = ["fused", "x"] + [n for n, _ in module.named_parameters()]
    for name, a, r in zip(names, fast, ref, strict=True):
        if r is None:  # alpha: fused does not depend on it
            assert a is None, name
            continue
        # key.bias gets no gradient (softmax over keys ignores a shift): compare absolutely.
        assert (a - r).norm() <= 1e-10 * r.norm() + 1e-12, name


@pytest.mark.parametrize("projection", ["map", "landmarks"])
def test_module_gradients_pass_gradcheck(projection):
    torch.manual_seed(1)
    module = CSALR(8, groups=2, grid=(2, 2), projection=projection, landmark_weight=1.5).double()
    names = ["query.weight", "key.weight", "value.weight", "value.bias", "fuse.weight"]
    weights = {name: p.detach().clone() for name, p in module.named_parameters()}
    weights["query.weight"] *= 10  # logits of a few units: softmaxes far from uniform
    weights["key.weight"] *= 10
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    inputs = [weights[name].requires_grad_() for name in names]

    def fused(x, *tensors):
        params = {**weights, **dict(zip(names, tensors, strict=True))}
        return torch.func.functional_call(module, params, (x,))[1]

    assert torch.autograd.gradcheck(fused, (x, *inputs))


def module_logits(module: torch.nn.Module, x: Tensor) -> Tensor:
    """The logits the module's softmaxes read: ``q . k`` per group (SA, CSALR) or CSA's
    ``14 cos(base, q)``."""
    if isinstance(module, CSA):
        q = attention.pointwise(x, module.query).flatten(2)  # (B, C', n)
        cosines = F.normalize(module.bases, dim=-1) @ F.normalize(q, dim=1).unsqueeze(1)
        return attention.CSA_SCALE * cosines  # (B, G, m, n)
    q, k = module.queries_keys(x)  # (B, G, d, H, W)
    return q.flatten(3).mT @ k.flatten(3)  # (B, G, n, n)


def sharp_module(kind: str, x: Tensor, spread: float = 30.0) -> torch.nn.Module:
    """A module whose logits on ``x`` have about ``spread`` standard deviation (CSA's cosine
    logits are bounded by 14 and keep theirs), as trained attention reaches."""
    torch.manual_seed(0)
    options = {"sa": {}, "csa": {"bases": 8}, "csalr": {"grid": (4, 2)}}[kind]
    module = ATTENTION[kind](x.shape[1], groups=2, **options)
    with torch.no_grad():
        module.alpha.fill_(1.0)
        if not isinstance(module, CSA):
            scale = (spread / module_logits(module, x).std()) ** 0.5
            module.query.weight.mul_(scale)
            module.key.weight.mul_(scale)
    return module


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_module_under_bfloat16_autocast_matches_float32_where_bf16_softmax_errs(kind):
    x = torch.randn(2, 32, 16, 8)
    module = sharp_module(kind, x)
    with torch.no_grad():
        logits = module_logits(module, x)
    rows = torch.softmax(logits, dim=-1)
    bf16_rows = torch.softmax(logits.bfloat16().float(), dim=-1)
    assert rel_err(bf16_rows, rows) > 0.01  # at this scale a bf16 softmax errs by percent

    expected = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = module(x)
    for got, want in zip(result, expected, strict=True):
        assert got.dtype == torch.float32
        assert rel_err(got, want) < 1e-3


def test_attention_output_under_autocast_feeds_a_bf16_trunk_and_gets_gradients():
    x = torch.randn(2, 32, 16, 8, requires_grad=True)
    module = sharp_module("csalr", x.detach())
    conv = torch.nn.Conv2d(32, 32, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = module(conv(x))  # a bf16 map in, as from an autocast trunk stage
        loss = conv(out).float().square().mean()  # and back into a bf16 stage
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_unknown_projection_is_refused():
    with pytest.raises(ConfigError, match="projection"):
        CSALR(16, projection="everywhere")


# ------------------------------------------------------------------------------------------
# The indicator weight c (A_nm = softmax + c P, A_mm = softmax + c I)
# ------------------------------------------------------------------------------------------


def literal_csalr(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], c: float) -> Tensor:
    """Eq. 13-17 for one image and group, written out with loops for P: ``(e, H, W)``.

    Independent of reidkit: avg_pool2d for the landmarks, explicit inverse for A_mm.
    """
    d, h, w = q.shape
    ph, pw = h // grid[0], w // grid[1]
    q_land = F.avg_pool2d(q[None], (ph, pw))[0].flatten(1)  # (d, m)
    k_land = F.avg_pool2d(k[None], (ph, pw))[0].flatten(1)  # (d, m)
    qf, kf, vf = q.flatten(1), k.flatten(1), v.flatten(1)  # (d, n), (d, n), (e, n)
    m, n = q_land.shape[1], h * w
    indicator = torch.zeros(n, m, dtype=q.dtype)
    for i in range(n):
        row, col = divmod(i, w)
        indicator[i, (row // ph) * grid[1] + col // pw] = 1.0
    a_nm = torch.softmax(qf.T @ k_land, dim=1) + c * indicator  # (n, m)
    a_mm = torch.softmax(q_land.T @ k_land, dim=1) + c * torch.eye(m, dtype=q.dtype)  # (m, m)
    b = torch.softmax(q_land.T @ kf, dim=1)  # (m, n)
    y = a_nm @ torch.linalg.inv(a_mm) @ b @ vf.T  # (n, e)
    return y.T.reshape(-1, h, w)


@pytest.mark.parametrize("weight", [1.0, 2.0, 3.5], ids=lambda c: f"c={c:g}")
def test_weighted_indicator_matches_a_literal_loop_reference(weight):
    q, k, v = random_qkv(2, 2, (24, 8), seed=21)
    fast = csalr_attention(q, k, v, (6, 4), landmark_weight=weight)
    ref = csalr_attention_reference(q, k, v, (6, 4), landmark_weight=weight)
    literal = torch.stack(
        [
            torch.stack(
                [literal_csalr(q[b, g], k[b, g], v[b, g], (6, 4), weight) for g in range(2)]
            )
            for b in range(2)
        ]
    )
    assert rel_err(fast, literal) < 1e-12
    assert rel_err(ref, literal) < 1e-12


def test_the_indicator_weight_changes_the_result():
    # A fast path that dropped c would still match itself at c = 1 only.
    q, k, v = random_qkv(1, 2, (24, 8), seed=22)
    paper = csalr_attention(q, k, v, (6, 4))
    weighted = csalr_attention(q, k, v, (6, 4), landmark_weight=2.0)
    assert rel_err(weighted, paper) > 1e-3


def tiny_qkv(b=2, g=2, hw=(8, 8), d=2, e=3, seed=0):
    """Inputs small enough for torch.autograd.gradcheck, with far-from-uniform softmaxes."""
    return [t.requires_grad_() for t in random_qkv(b, g, hw, seed=seed, d=d, e=e)]


def test_weighted_core_passes_gradcheck():
    q, k, v = tiny_qkv(seed=3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: csalr_attention(q, k, v, (2, 2), landmark_weight=2.0), (q, k, v)
    )


@pytest.mark.parametrize("weight", [1.0, 2.0, 3.5], ids=lambda c: f"c={c:g}")
def test_weighted_map_rows_sum_to_one_and_are_exact_at_full_resolution(weight):
    # A_nm 1 = A_mm 1 = (1 + c) 1 and B 1 = 1 for every c; with m = n, A_nm = A_mm.
    q, k, v = random_qkv(2, 2, (24, 8), seed=23, logit_std=3.0)
    rows = csalr_attention_map(q, k, (6, 4), landmark_weight=weight).sum(dim=-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-12)
    exact = csalr_attention(q, k, v, (24, 8), landmark_weight=weight)
    assert rel_err(exact, full_attention_reference(q, k, v)) < 1e-12


def two_cycle_probs(m: int, sharpness: float) -> Tensor:
    """softmax_m rows where landmark 2j attends to 2j+1 and back: s_kk close to 0.

    The shape attention takes when trained from scratch at a high rate: A_mm = probs + I then
    has rows [1 + eps, 1 - eps] in each 2x2 block, nearly singular.
    """
    logits = torch.zeros(m, m, dtype=torch.float64)
    partner = torch.arange(m) ^ 1  # 0<->1, 2<->3, ...
    logits[torch.arange(m), partner] = sharpness
    return logits.softmax(dim=-1)[None]  # (1, m, m)


@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_condition_bound_from_the_margin_bounds_the_true_condition_number(weight):
    # Varah: cond_inf(A_mm) <= (1 + c) / (c - 1 + 2 min s_kk), checked on matrices from the
    # uniform one to the nearly singular two-cycle.
    eye = torch.eye(96, dtype=torch.float64)
    for sharpness in (0.0, 2.0, 8.0, 16.0):  # s_kk from 1/96 down to 1e-7
        probs = two_cycle_probs(96, sharpness)[0]
        margin = (weight - 1 + 2 * probs.diagonal().min()).item()
        true_cond = torch.linalg.cond(probs + weight * eye, p=float("inf")).item()
        assert landmark_condition_bound(margin, weight) >= true_cond * (1 - 1e-9)
    sharp = two_cycle_probs(96, 40.0)[0]  # s_kk ~ 4e-18
    margin = (weight - 1 + 2 * sharp.diagonal().min()).item()
    if weight == 2.0:  # c = 2: the bound is at most 3 whatever the attention does
        assert landmark_condition_bound(margin, weight) <= 3.0
        assert torch.linalg.cond(sharp + 2 * eye, p=float("inf")) <= 3.0 + 1e-9
    else:  # the paper's c = 1: the same attention leaves A_mm singular to working precision
        assert landmark_condition_bound(margin, weight) > 1e16
        assert torch.linalg.cond(sharp + eye).item() > 1e12


@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_module_records_the_smallest_landmark_margin_in_training_only(weight):
    x = torch.randn(3, 32, 16, 8)
    module = sharp_module("csalr", x, spread=10.0)
    module.landmark_weight = weight
    module.eval()
    module(x)
    assert module.landmark_margin is None
    module.train()
    module(x)
    q, k = module.queries_keys(x)
    _, a_mm, _ = csalr_blocks(q.double(), k.double(), module.grid, weight)  # literal eq. 16
    diagonal = a_mm.diagonal(dim1=-2, dim2=-1)  # (B, G, m)
    expected = (2 * diagonal - a_mm.sum(dim=-1)).min()  # A_kk - sum_{j != k} A_kj
    torch.testing.assert_close(module.landmark_margin.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight", [0.5, 0.0, -1.0, float("nan")])
def test_a_landmark_weight_below_one_is_refused(weight):
    q, k, v = random_qkv(1, 1, (8, 4))
    with pytest.raises(ConfigError, match="landmark_weight"):
        csalr_attention(q, k, v, (4, 2), landmark_weight=weight)
    with pytest.raises(ConfigError, match="landmark_weight"):
        CSALR(16, grid=(4, 2), landmark_weight=weight)


def test_build_attention_passes_the_landmark_weight_to_csalr_and_refuses_it_elsewhere():
    assert build_attention("csalr", 16, grid=(4, 2), landmark_weight=2.0).landmark_weight == 2.0
    with pytest.raises(ConfigError, match="landmark_weight"):
        build_attention("sa", 16, landmark_weight=2.0)


def test_the_modules_are_plain_autograd():
    # The code that runs is the code a reader finds: no hand-written backward, no private ops.
    functions = [
        obj
        for obj in vars(attention).values()
        if isinstance(obj, type) and issubclass(obj, torch.autograd.Function)
    ]
    assert functions == []
    source = inspect.getsource(attention)
    assert "torch._" not in source and "autograd.Function" not in source


# ------------------------------------------------------------------------------------------
# On a CUDA GPU (skipped without one; CI has none)
# ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("kind", list(ATTENTION))
def test_modules_on_cuda_match_the_cpu_in_float64_and_hold_under_bf16_autocast(kind):
    x = torch.randn(2, 32, 16, 8)
    module = sharp_module(kind, x)
    expected = [t.double() for t in module.double()(x.double())]
    module = module.float().cuda()
    result = module(x.cuda())
    for got, want in zip(result, expected, strict=True):
        assert rel_err(got.cpu(), want) < 1e-4  # float32 on the GPU, TF32 convs included
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = module(x.cuda())
    for got, want in zip(mixed, result, strict=True):
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-3


# ------------------------------------------------------------------------------------------
# Newton-Schulz landmark solve (ONNX export)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharpness", [0.0, 4.0, 40.0])
def test_newton_schulz_with_c2_is_exact_in_five_steps_for_any_attention(sharpness):
    # From uniform rows to the two-cycle whose c = 1 matrix is singular.
    probs = two_cycle_probs(96, sharpness).float()  # (1, m, m)
    a_mm = probs + 2 * torch.eye(96)
    rhs = torch.randn(1, 96, 16)
    steps = attention.newton_schulz_iterations(2.0)
    assert steps == 5  # r <= 1/2, and (1/2)^(2^5) < 2^-24 <= (1/2)^(2^4)
    result = attention.solve_landmarks(a_mm, rhs, steps)
    expected = torch.linalg.solve(a_mm.double(), rhs.double())
    assert rel_err(result, expected) < 1e-5  # float32 rounding of ten 96-long products


@pytest.mark.parametrize(("weight", "self_weight"), [(1.0, 1e-2), (1.0, 1e-5), (1.5, 0.0)])
def test_newton_schulz_step_count_is_the_smallest_that_reaches_float32(weight, self_weight):
    r = (1 - self_weight) / (weight + self_weight)  # ||I - D^-1 A_mm||_inf at worst
    steps = attention.newton_schulz_iterations(weight, self_weight)
    assert r ** (2**steps) <= 2**-24 < r ** (2 ** (steps - 1))


def test_newton_schulz_has_no_step_count_for_the_papers_weight_without_a_floor():
    with pytest.raises(ValueError, match="no step count"):
        attention.newton_schulz_iterations(1.0, 0.0)


def test_module_with_newton_schulz_steps_matches_its_lu_solve():
    x = torch.randn(2, 32, 16, 8)
    module = sharp_module("csalr", x, spread=4.0)
    module.landmark_weight = 2.0
    expected = module(x)
    module.solve_iterations = attention.newton_schulz_iterations(2.0)
    for got, want in zip(module(x), expected, strict=True):
        assert rel_err(got, want) < 1e-5
