"""Attention cores against their naive references, the paper's approximation claim, modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from reidkit.errors import ConfigError
from reidkit.models import attention
from reidkit.models.attention import (
    ATTENTION,
    CSA,
    CSALR,
    SelfAttention,
    build_attention,
    csa_attention,
    csa_attention_map,
    csa_attention_reference,
    csalr_attention,
    csalr_attention_map,
    csalr_attention_reference,
    full_attention,
    full_attention_map,
    full_attention_materialised,
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
    assert y.dtype == torch.bfloat16
    assert rel_err(y, expected) < 2e-2  # bf16 keeps ~3 digits; measured 6e-3
    y.float().square().sum().backward()
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


@pytest.mark.parametrize(("core", "hw", "groups"), FULL_CASES, ids=str)
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


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("hw", STAGES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_csa_matches_reference_float64_values_and_grads(hw, groups):
    b = batch_for(hw)
    q, _, v = random_qkv(b, groups, hw, seed=groups)
    bases = torch.randn(groups, 5, D, dtype=torch.float64)
    grad_out = torch.randn(b, groups, E, *hw, dtype=torch.float64)
    fast = values_and_grads(csa_attention, (q, v, bases), grad_out)
    ref = values_and_grads(csa_attention_reference, (q, v, bases), grad_out)
    for name, a, r in zip(("y", "dq", "dv", "dbases"), fast, ref, strict=True):
        assert rel_err(a, r) < 1e-10, name


def test_csa_float32_agrees_with_float64_reference():
    q, _, v = random_qkv(2, 2, (48, 16), seed=9, d=8)
    bases = torch.randn(2, 32, 8, dtype=torch.float64)
    grad_out = torch.randn(2, 2, E, 48, 16, dtype=torch.float64)
    ref = values_and_grads(csa_attention_reference, (q, v, bases), grad_out)
    fast = values_and_grads(csa_attention, (q.float(), v.float(), bases.float()), grad_out.float())
    for name, a, r in zip(("y", "dq", "dv", "dbases"), fast, ref, strict=True):
        assert rel_err(a, r) < 1e-5, name


def test_csa_by_hand_two_positions_two_bases():
    # q_0 = b_0 and q_1 = b_1, orthonormal: S = 14 I. Both softmaxes give [[p, 1-p], [1-p, p]]
    # with p = sigmoid(14); E = Ab v = [p, 1-p] for v = [1, 0]; Y_i = sum_k Wc_ki E_k.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # (d, n)
    q = q.view(1, 1, 2, 1, 2)  # (B, G, d, H, W)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 1, 2)  # (B, G, e, H, W)
    bases = torch.eye(2, dtype=torch.float64).view(1, 2, 2)  # (G, m, d)
    p = torch.sigmoid(torch.tensor(14.0, dtype=torch.float64))
    expected = torch.stack([p * p + (1 - p) * (1 - p), 2 * p * (1 - p)]).view(1, 1, 1, 1, 2)
    for core in (csa_attention, csa_attention_reference):
        torch.testing.assert_close(core(3 * q, v, 0.5 * bases), expected)  # cosines: scale-free


def test_csa_core_equals_its_map_applied_to_v():
    q, _, v = random_qkv(2, 2, (24, 8), seed=10)
    bases = torch.randn(2, 5, D, dtype=torch.float64)
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
    module = CSA(64, groups=2, bases=8)  # d = 8 per group: 8 x 8, rows orthonormal
    assert module.bases.shape == (2, 8, 8)
    for group in module.bases.detach():
        torch.testing.assert_close(group @ group.T, torch.eye(8), atol=1e-5, rtol=0)
    tall = CSA(32, groups=2, bases=32)  # d = 4 < m = 32: columns orthonormal
    for group in tall.bases.detach():
        torch.testing.assert_close(group.T @ group, torch.eye(4), atol=1e-5, rtol=0)


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


def test_build_attention_passes_each_class_only_its_options():
    options = {"groups": 2, "grid": (4, 4), "qk_ratio": 0.5, "bases": 8}
    sa = build_attention("sa", 32, **options)
    csa = build_attention("csa", 32, **options)
    csalr = build_attention("csalr", 32, **options)
    assert type(sa) is SelfAttention and sa.groups == 2 and sa.query.out_channels == 16
    assert type(csa) is CSA and csa.bases.shape == (2, 8, 8) and csa.key is None
    assert type(csalr) is CSALR and csalr.grid == (4, 4) and csalr.key.out_channels == 16


def test_build_attention_keeps_class_defaults_for_unset_options():
    assert build_attention("sa", 32).groups == 1
    module = build_attention("csalr", 32, groups=4)
    assert module.groups == 4 and module.grid == (12, 8)


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
# CSALR kernels: slices, folded indicator, in-place softmax backward, autograd Functions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "block", "budget"), [(16, 10, 1000), (16, 10, 45), (7, 3, 5)])
def test_chunks_cover_the_range_in_near_equal_slices(monkeypatch, length, block, budget):
    monkeypatch.setattr(attention, "CSALR_BLOCK_ELEMENTS", budget)
    slices = attention._chunks(length, block)
    covered = [i for s in slices for i in range(length)[s]]
    assert covered == list(range(length))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) * block <= max(budget, block)  # a slice fits, or holds one item
    assert max(sizes) - min(sizes) <= max(sizes) // 2 + 1


@pytest.mark.parametrize("grid", [(3, 2), (6, 4), (12, 8), (24, 8)], ids=str)
def test_indicator_is_added_at_each_positions_patch(grid):
    coeff = torch.rand(3, 24 * 8, grid[0] * grid[1], dtype=torch.float64)
    expected = coeff + attention._patch_indicator(24, 8, grid, coeff)
    assert torch.equal(attention._add_indicator_(coeff.clone(), grid, (24, 8)), expected)


def test_spread_add_is_rows_times_the_transposed_indicator():
    grid, size = (6, 4), (24, 8)
    target = torch.randn(2, 3, 192, dtype=torch.float64)
    rows = torch.randn(2, 3, 24, dtype=torch.float64)
    indicator = attention._patch_indicator(*size, grid, rows)  # (n, m)
    expected = target + rows @ indicator.T
    attention._spread_add_(target, rows, grid, size)
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid", [(6, 4), (12, 8), (24, 8)], ids=str)
def test_pool_is_average_pooling(grid):
    x = torch.randn(2, 3, 96, 32, dtype=torch.float64, requires_grad=True)
    patch = (96 // grid[0], 32 // grid[1])
    pooled = attention._pool(x, grid)
    torch.testing.assert_close(pooled, F.avg_pool2d(x, patch).flatten(2))
    assert torch.autograd.gradcheck(lambda t: attention._pool(t, grid), (x[:1, :1, :48, :16],))


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 96, 40), (3, 40, 96)])
def test_in_place_softmax_backward_matches_autograd(shape):
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    prob = logits.softmax(dim=-1)
    grad = torch.randn(shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(prob, logits, grad)
    buffer = grad.clone()
    result = attention._softmax_backward_(buffer, prob.detach())
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-14)
    assert result.data_ptr() == buffer.data_ptr()  # written over the gradient on the CPU


def tiny_qkv(b=2, g=2, hw=(8, 8), d=2, e=3, seed=0):
    """Inputs small enough for torch.autograd.gradcheck, with far-from-uniform softmaxes."""
    return [t.requires_grad_() for t in random_qkv(b, g, hw, seed=seed, d=d, e=e)]


@pytest.mark.parametrize("budget", [1 << 20, 40])  # one slice; slices of one group-image
def test_csalr_core_function_passes_gradcheck(monkeypatch, budget):
    monkeypatch.setattr(attention, "CSALR_BLOCK_ELEMENTS", budget)
    q, k, v = tiny_qkv()
    assert torch.autograd.gradcheck(lambda q, k, v: csalr_attention(q, k, v, (2, 2)), (q, k, v))


@pytest.mark.parametrize("budget", [200_000, 3000])
def test_csalr_core_in_uneven_slices_matches_reference_float64(monkeypatch, budget):
    # 3 images x 2 groups; 3000 elements per block slice at m x n = 96 x 768 makes slices of
    # one group-image, 200_000 slices of two: uneven ones (2, 2, 2 / 1, 1, ...).
    monkeypatch.setattr(attention, "CSALR_BLOCK_ELEMENTS", budget)
    q, k, v = random_qkv(3, 2, (48, 16), seed=11)
    grad_out = torch.randn(3, 2, E, 48, 16, dtype=torch.float64)
    fast = values_and_grads(lambda q, k, v: csalr_attention(q, k, v, (12, 8)), (q, k, v), grad_out)
    ref = values_and_grads(
        lambda q, k, v: csalr_attention_reference(q, k, v, (12, 8)), (q, k, v), grad_out
    )
    for name, a, r in zip(("y", "dq", "dk", "dv"), fast, ref, strict=True):
        assert rel_err(a, r) < 1e-10, name


def test_csalr_core_saves_no_map_sized_block_for_backward():
    # Autograd may keep q, k, v (the caller's tensors) and m x m / m x e ones, nothing m x n.
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 2, (48, 16), d=4, e=8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        csalr_attention(q, k, v, (12, 8))
    inputs = {t.data_ptr() for t in (q, k, v)}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert extra and max(t.numel() for t in extra) <= 2 * 2 * 96 * 96  # BG x m x m at most


def test_landmark_pool_and_spread_pass_gradcheck():
    gen = torch.Generator().manual_seed(12)
    q_land = torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=gen).requires_grad_()
    k = torch.randn(2, 2, 3, 16, dtype=torch.float64, generator=gen).requires_grad_()
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(attention._LandmarkPool.apply, (q_land, k, x))
    q = torch.randn(2, 2, 3, 16, dtype=torch.float64, generator=gen).requires_grad_()
    k_land = torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=gen).requires_grad_()
    rows = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=gen).requires_grad_()
    bias = torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_()
    spread = attention._LandmarkSpread.apply
    assert torch.autograd.gradcheck(
        lambda q, k, r, b: spread(q, k, r, b, (2, 2), (4, 4), 1.0), (q, k_land, rows, bias)
    )
    assert torch.autograd.gradcheck(
        lambda q, k, r: spread(q, k, r, None, (2, 2), (4, 4), 2.0), (q, k_land, rows)
    )


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
@pytest.mark.parametrize("projection", ["pixels", "landmarks"])
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


def test_landmark_projection_in_slices_matches_the_reference(monkeypatch):
    monkeypatch.setattr(attention, "CSALR_BLOCK_ELEMENTS", 100)  # one image per slice
    torch.manual_seed(0)
    module = CSALR(16, groups=2, grid=(4, 2), projection="landmarks").double()
    x = torch.randn(3, 16, 8, 4, dtype=torch.float64)
    grad = torch.randn(3, 16, 8, 4, dtype=torch.float64)
    fast = module_values_and_grads(module, lambda m, x: m.fused_output(x), x, grad)
    ref = module_values_and_grads(module, reference_fused, x, grad)
    for a, r in zip(fast, ref, strict=True):
        assert (a is None) == (r is None)
        if r is not None:
            assert (a - r).norm() <= 1e-10 * r.norm() + 1e-12


def test_landmark_projection_under_bfloat16_autocast_solves_in_float32(monkeypatch):
    solve_dtypes = []
    solve = torch.linalg.solve

    def spy(a, b, *args, **kwargs):
        solve_dtypes.append((a.dtype, b.dtype))
        return solve(a, b, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve", spy)
    torch.manual_seed(0)
    module = CSALR(32, groups=2, grid=(4, 2), projection="landmarks")
    x = torch.randn(2, 32, 16, 8, requires_grad=True)
    expected = module.fused_output(x).detach()
    solve_dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = module.fused_output(x)
    assert solve_dtypes == [(torch.float32, torch.float32)]
    assert fused.dtype == torch.bfloat16
    assert rel_err(fused, expected) < 2e-2
    fused.float().square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_projection_costs_by_hand():
    # C = 4, G = 2, m = 2, n = 8: pixels 2*16*8 + 2*4*2*8 = 384; landmarks 2*16*2 + 2*2*4*2*8.
    assert attention.csalr_projection_costs(4, 2, 2, 8) == {"pixels": 384, "landmarks": 320}


@pytest.mark.parametrize(
    ("channels", "groups", "hw", "landmarks"),
    [
        (256, 2, (96, 32), True),  # the paper's setting, stage 1
        (256, 4, (96, 32), False),  # (G - 1) m > C: the convs on the map cost less
        (512, 4, (48, 16), True),
        (1024, 8, (24, 8), False),
        (1024, 2, (24, 8), True),
    ],
)
def test_auto_projection_picks_fewer_multiply_adds(channels, groups, hw, landmarks):
    module = CSALR(channels, groups=groups, grid=(12, 8))
    assert module.projects_on_landmarks(*hw) is landmarks
    assert CSALR(channels, groups=groups, projection="pixels").projects_on_landmarks(*hw) is False
    forced = CSALR(channels, groups=groups, projection="landmarks")
    assert forced.projects_on_landmarks(*hw) is True


def test_unknown_projection_is_refused():
    with pytest.raises(ConfigError, match="projection"):
        CSALR(16, projection="everywhere")


def test_pointwise_is_the_stacked_convs():
    convs = [torch.nn.Conv2d(6, c, 1).double() for c in (2, 3, 6)]
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    expected = torch.cat([conv(x) for conv in convs], dim=1)
    torch.testing.assert_close(attention.pointwise(x, convs), expected)
    bare = [torch.nn.Conv2d(6, 2, 1, bias=False).double()]
    torch.testing.assert_close(attention.pointwise(x, bare), bare[0](x))


# ------------------------------------------------------------------------------------------
# Gated residual and deep-supervision pooling
# ------------------------------------------------------------------------------------------


def gate_inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    fused = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    return x, fused, alpha


def test_gated_residual_is_x_plus_alpha_fused_with_its_gradients():
    x, fused, alpha = gate_inputs()
    grad = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    fast = values_and_grads(attention.gated_residual, (x, fused, alpha), grad)
    plain = values_and_grads(lambda x, f, a: x + a * f, (x, fused, alpha), grad)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(attention.gated_residual, (x, fused, alpha))


def test_gated_residual_and_pool_gives_the_gate_and_deep_supervision_pooling():
    x, fused, alpha = gate_inputs(1)
    out, pooled = attention.gated_residual_and_pool(x, fused, alpha)
    torch.testing.assert_close(out, x + alpha * fused)
    torch.testing.assert_close(pooled, (x * fused).mean(dim=(2, 3)))
    assert torch.autograd.gradcheck(attention.gated_residual_and_pool, (x, fused, alpha))


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


def test_weight_two_bounds_the_landmark_inverse_where_the_papers_weight_does_not():
    probs = two_cycle_probs(96, sharpness=40.0)  # s_kk ~ 4e-18
    eye = torch.eye(96, dtype=torch.float64)[None]
    inverse_c2 = attention._landmark_solve(probs, eye, weight=2.0)  # (probs + 2I)^-1
    torch.testing.assert_close((probs + 2 * eye) @ inverse_c2, eye, rtol=0, atol=1e-12)
    # Varah: ||A^-1||_inf <= 1 / (c - 1 + 2 min s_kk) = 1 at c = 2.
    assert inverse_c2.abs().sum(dim=-1).max() <= 1 + 1e-12
    # The paper's c = 1: the same probabilities leave A_mm singular to working precision.
    assert torch.linalg.cond(probs + eye).item() > 1e12


@pytest.mark.parametrize("weight", [0.5, 0.0, -1.0, float("nan")])
def test_a_landmark_weight_below_one_is_refused(weight):
    q, k, v = random_qkv(1, 1, (8, 4))
    with pytest.raises(ConfigError, match="landmark_weight"):
        csalr_attention(q, k, v, (4, 2), landmark_weight=weight)
    with pytest.raises(ConfigError, match="landmark_weight"):
        CSALR(16, grid=(4, 2), landmark_weight=weight)


def test_build_attention_passes_the_landmark_weight_to_csalr_only():
    assert build_attention("csalr", 16, grid=(4, 2), landmark_weight=2.0).landmark_weight == 2.0
    assert not hasattr(build_attention("sa", 16, landmark_weight=2.0), "landmark_weight")
