"""Self-attention modules SA, CSA and CSALR, each a gated residual around one grouped core.

Chen, Gong, Ge, Du, "Compressed Self-Attention for Deep Metric Learning with Low-Rank
Approximation", IJCAI 2020, section 3.2: SA (eq. 1-2), CSALR (eq. 10-17); CSA is Chen et al.,
AAAI 2020. The literal forms the tests hold these to are in :mod:`reidkit.models.reference`.

The cores work per group on channel-major tensors: ``q`` and ``k`` are ``(batch, G, d, H, W)``,
``v`` is ``(batch, G, e, H, W)`` and the result is ``(batch, G, e, H, W)``, so a module's 1x1
conv outputs go in, and the fuse conv's input comes out, by reshaping alone. As in the paper
(``exp(Q^T K)``), no logits are divided by ``sqrt(d)``.

Modules and cores run in float32 even under autocast: bfloat16 keeps three significant digits
of a logit, and exp turns an absolute logit error into a relative weight error, so softmax rows
err by percent at the logit scales trained attention reaches; the CPU has no half-precision LU
for CSALR's solve either. The trunk around them keeps autocast's speed.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.functional import avg_pool2d, normalize, pad, scaled_dot_product_attention

from reidkit.errors import ConfigError
from reidkit.models import reference
from reidkit.models.reference import CSA_SCALE, patch_size

# The paper does not say how Q and K start. At PyTorch's default scale, real stage-3 features
# gave logits spread enough that some landmark rows of A_mm = softmax + I put almost no weight
# on their own diagonal: condition numbers over 1,000 at initialisation, outputs 20x those of
# full attention, and training that diverged within a few steps. A tenth of the default scale
# starts every softmax near uniform, where A_mm (about I + 11^T/m) is conditioned about 2; the
# attention sharpens as it learns. Applied to every module so SA, CSA and CSALR start alike.
QK_INIT_SCALE = 0.1

# The weight c of the indicator terms 1(.) in eq. 15-16: A_nm = softmax_m(Q K'^T) + c P and
# A_mm = softmax_m(Q' K'^T) + c I. Row k of A_mm exceeds the rest of its row by its diagonal
# margin c - 1 + 2 s_kk (s_kk: landmark k's softmax weight on itself), and by Varah's bound
# ||A_mm^-1||_inf <= 1 / margin. The paper's c = 1 leaves the margin at 2 s_kk, which reaches
# zero once a landmark attends away from itself: trained from scratch at lr 0.05 on the CPU,
# the condition number reached 2e16 and the solve failed at epoch 3. c = 2 bounds the inverse
# by 1 (the same run trained 8 epochs to 90% training accuracy). Any c keeps each row of
# W = A_nm A_mm^-1 summing to 1 and the approximation exact when every position is a landmark;
# the error of a random map barely moves (96 landmarks at 48x16: 0.509 at c = 1, 0.530 at 2).
LANDMARK_WEIGHT = 1.0

Core = TypeVar("Core", bound=Callable[..., Tensor])


def full_precision(core: Core) -> Core:
    """Run an attention core outside autocast, on float32 copies of half-precision tensors.

    Float64 stays float64 (the tests' references); the caller's next layer casts back.
    """

    @functools.wraps(core)
    def wrapper(*args, **kwargs):
        device = next(a for a in args if isinstance(a, Tensor)).device.type

        def widen(value):
            if isinstance(value, Tensor) and value.is_floating_point():
                return value.to(torch.promote_types(value.dtype, torch.float32))
            return value

        with torch.autocast(device, enabled=False):
            return core(*map(widen, args), **{key: widen(v) for key, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def _check_qkv(q: Tensor, k: Tensor | None, v: Tensor) -> None:
    """Refuse tensors that do not follow the (batch, G, channels, H, W) layout of the cores."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and t.dim() != 5:
            raise ValueError(f"{name} must be (batch, G, channels, H, W), got {tuple(t.shape)}")
    if k is not None and k.shape != q.shape:
        raise ValueError(f"q and k shapes differ: {tuple(q.shape)} vs {tuple(k.shape)}")
    b, g, _, h, w = q.shape
    if (v.shape[0], v.shape[1], v.shape[3], v.shape[4]) != (b, g, h, w):
        raise ValueError(f"v shape {tuple(v.shape)} does not match q shape {tuple(q.shape)}")


def _check_landmark_weight(weight: float) -> None:
    """Refuse ``c < 1``: below it A_mm is no longer diagonally dominant by construction."""
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 1):
        raise ConfigError(
            f"CSALR: landmark_weight must be a number >= 1 (1 is the paper's), got {weight!r}"
        )


# --------------------------------------------------------------------------------------------
# SA: full self-attention (eq. 1-2)
# --------------------------------------------------------------------------------------------


@full_precision
def full_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full self-attention ``softmax_n(Q K^T) V`` per group, without an n x n matrix.

    Runs through ``scaled_dot_product_attention(..., scale=1.0)``. On CPU only its flash
    kernel avoids the n x n map, and it takes q, k and v of one head width only, falling back
    silently to the n x n math kernel otherwise; so on CPU Q and K (d channels) are padded
    with zeros up to V's width e, or V up to d. Zero channels add exact zeros to every
    ``Q_i . K_j``, and zero V channels give output channels that are sliced off. On CUDA the
    memory-efficient kernel takes d != e in float32, so nothing is padded there.

    Args:
        q: queries ``(batch, G, d, H, W)``.
        k: keys ``(batch, G, d, H, W)``.
        v: values ``(batch, G, e, H, W)``.

    Returns:
        ``(batch, G, e, H, W)``.
    """
    _check_qkv(q, k, v)
    h, w = q.shape[-2:]
    d, e = q.shape[2], v.shape[2]
    queries = q.flatten(3).mT  # (batch, G, n, d)
    keys = k.flatten(3).mT  # (batch, G, n, d)
    values = v.flatten(3).mT  # (batch, G, n, e)
    if q.device.type == "cpu" and d != e:
        width = max(d, e)
        queries = pad(queries, (0, width - d))  # (batch, G, n, width)
        keys = pad(keys, (0, width - d))  # (batch, G, n, width)
        values = pad(values, (0, width - e))  # (batch, G, n, width)
    y = scaled_dot_product_attention(
        queries.contiguous(), keys.contiguous(), values.contiguous(), scale=1.0
    )  # (batch, G, n, width)
    return y[..., :e].mT.unflatten(-1, (h, w))  # (batch, G, e, H, W)


@full_precision
def full_attention_materialised(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full self-attention with the n x n map held in memory: the paper's cost, for benchmarks.

    Same arguments and result as :func:`full_attention`.
    """
    _check_qkv(q, k, v)
    attention = torch.softmax(q.flatten(3).mT @ k.flatten(3), dim=-1)  # A: (batch, G, n, n)
    y = v.flatten(3) @ attention.mT  # Y^T = V^T A^T: (batch, G, e, n)
    return y.unflatten(-1, q.shape[-2:])  # (batch, G, e, H, W)


# --------------------------------------------------------------------------------------------
# CSALR: compressed self-attention with low-rank approximation (eq. 10-17)
# --------------------------------------------------------------------------------------------


def landmarks(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Landmark vectors: ``x`` ``(batch, G, c, H, W)`` average pooled over the grid's patches
    (kernel = stride = ``(H/H', W/W')``, section 3.2) -> ``(batch, G, c, m)``, row-major."""
    b, g, c, h, w = x.shape
    pooled = avg_pool2d(x.reshape(b * g, c, h, w), patch_size(grid, h, w))  # (bG, c, H', W')
    return pooled.view(b, g, c, -1)  # (batch, G, c, m)


def landmark_attention(q_land: Tensor, k_land: Tensor) -> Tensor:
    """``softmax_m(Q' K'^T)``, the softmax of ``A_mm`` (eq. 12): ``(batch, G, m, m)``."""
    return torch.softmax(q_land.mT @ k_land, dim=-1)


def solve_landmarks(A_mm: Tensor, E: Tensor, iterations: int | None = None) -> Tensor:
    """``F = A_mm^{-1} E`` for ``A_mm`` ``(..., m, m)`` and ``E`` ``(..., m, e)``.

    By LU (``torch.linalg.solve``; never an explicit inverse), or, given ``iterations``, by that
    many Newton-Schulz steps: ONNX has no solve operator, and these are matrix products only.
    From ``X_0 = D^{-1}`` (the inverse of A_mm's diagonal), ``X_{k+1} = (2I - X_k A) X_k``
    squares the residual each step, ``I - X_{k+1} A = (I - X_k A)^2``, and it starts below 1:
    ``||I - D^{-1} A_mm||_inf = max_k (1 - s_kk) / (c + s_kk)``, as each row of A_mm is
    strictly diagonally dominant (:func:`newton_schulz_iterations` turns that into a count).
    """
    if iterations is None:
        return torch.linalg.solve(A_mm, E)
    eye = torch.eye(A_mm.shape[-1], dtype=A_mm.dtype, device=A_mm.device)  # (m, m)
    X = torch.diag_embed(1 / A_mm.diagonal(dim1=-2, dim2=-1))  # X_0 = D^{-1}: (..., m, m)
    for _ in range(iterations):
        X = (2 * eye - X @ A_mm) @ X
    return X @ E


def newton_schulz_iterations(landmark_weight: float, min_self_weight: float = 0.0) -> int:
    """Newton-Schulz steps after which ``||I - X A_mm||_inf <= 2^-24`` (float32's rounding).

    The residual starts at most ``r = (1 - s) / (c + s)`` when every landmark's softmax weight
    on itself is at least ``s = min_self_weight``, and after k steps it is at most ``r^(2^k)``.
    For ``c >= 2``, ``r <= 1/2`` whatever the attention does: 5 steps. The paper's c = 1 gives
    ``r`` near 1 as ``s`` nears 0, so the count depends on the smallest self-weight the model
    meets; with ``s = 0`` there is none (``ValueError``).
    """
    c, s = float(landmark_weight), float(min_self_weight)
    r = (1 - s) / (c + s)
    if r >= 1:
        raise ValueError(f"no step count suffices for c = {c:g} and self-weight {s:g}")
    return max(1, math.ceil(math.log2(24 * math.log(2) / -math.log(r))))


def spread_over_patches(rows: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``rows P^T``: each landmark's entry copied to every position of its pooling patch.

    ``rows`` ``(..., c, m)`` -> ``(..., c, H', ph, W', pw)``, to add to a map viewed the same
    way (positions are row-major, so ``(H, W) = (H' ph, W' pw)``); broadcasting, no copy.
    """
    gh, gw = grid
    return rows.unflatten(-1, (gh, 1, gw, 1))  # (..., c, H', 1, W', 1)


@full_precision
def csalr_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int],
    *,
    landmark_weight: float = LANDMARK_WEIGHT,
    solve_iterations: int | None = None,
) -> Tensor:
    """CSALR per group, ``Y = A_nm A_mm^{-1} B V`` (eq. 14-17), re-associated.

    Neither the combination coefficient map ``W = A_nm A_mm^{-1}`` nor any n x n matrix is
    formed: ``Y = A_nm F`` with ``F = A_mm^{-1} (B V)`` found by a solve, and ``A_nm``'s
    indicator part ``c P`` applied as a copy of F's rows over their patches.

    Args:
        q: queries ``(batch, G, d, H, W)``.
        k: keys ``(batch, G, d, H, W)``.
        v: values ``(batch, G, e, H, W)``.
        grid: landmark grid ``(H', W')``, m = H'W' landmarks per group; it must divide (H, W).
        landmark_weight: the indicator weight c (:data:`LANDMARK_WEIGHT`; the paper's is 1).
        solve_iterations: None solves by LU; a count solves by that many Newton-Schulz steps
            (:func:`solve_landmarks`, for ONNX export).

    Returns:
        ``(batch, G, e, H, W)``.

    Raises:
        ConfigError: the grid does not divide the map, or ``landmark_weight < 1``.
    """
    _check_qkv(q, k, v)
    b, g, _, h, w = q.shape
    e = v.shape[2]
    ph, pw = patch_size(grid, h, w)
    _check_landmark_weight(landmark_weight)
    c = float(landmark_weight)
    Q, K, V = q.flatten(3), k.flatten(3), v.flatten(3)  # (batch, G, d|d|e, n)
    Q_land, K_land = landmarks(q, grid), landmarks(k, grid)  # Q', K': (batch, G, d, m)
    eye = torch.eye(Q_land.shape[-1], dtype=q.dtype, device=q.device)  # (m, m)

    B = torch.softmax(Q_land.mT @ K, dim=-1)  # B = A_mn, eq. 13: (batch, G, m, n)
    E = B @ V.mT  # landmark output E = B V: (batch, G, m, e)
    A_mm = landmark_attention(Q_land, K_land) + c * eye  # eq. 16: (batch, G, m, m)
    F = solve_landmarks(A_mm, E, solve_iterations)  # A_mm^{-1} E: (batch, G, m, e)
    # softmax of A_nm (eq. 15), held transposed, S_nm^T: (batch, G, m, n), normalised over m
    S_nm_t = torch.softmax(K_land.mT @ Q, dim=-2)
    Y = F.mT @ S_nm_t  # (S_nm F)^T: (batch, G, e, n)
    Y = Y.view(b, g, e, h // ph, ph, w // pw, pw) + c * spread_over_patches(F.mT, grid, (h, w))
    return Y.view(b, g, e, h, w)  # A_nm F = (S_nm + c P) F, eq. 17 without the gate


@full_precision
def csalr_fused_on_landmarks(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    value: nn.Conv2d,
    fuse: nn.Conv2d,
    grid: tuple[int, int],
    *,
    landmark_weight: float = LANDMARK_WEIGHT,
    solve_iterations: int | None = None,
) -> Tensor:
    """``fuse(csalr_attention(q, k, value(x)))`` with value and fuse applied to landmark rows.

    Why it is exact: the value and fuse convs are 1x1, linear maps over channels, and CSALR
    mixes positions only, so the two commute. Group g's landmark output is then
    ``E_g^T = W_v,g (X B_g^T) + b_v,g`` (the value bias passes through because B's rows sum to
    1), ``F_g = A_mm,g^{-1} E_g``, and the fused map is ``sum_g (W_f,g F_g^T) A_nm,g^T + b_f``.

    Why: value and fuse then act on G x m landmark rows instead of n positions, which costs
    ``2 C^2 m + 2 G C m n`` multiply-adds per image against ``2 C^2 n + 2 C m n`` on the map,
    fewer when ``G m`` is small against C (the paper's 2 groups of 96 at stages 1-3), and the
    map-sized V and Y are never formed. With 4 or 8 groups the map form costs less
    (``attention.projection = "map"``).

    Args:
        x: the module's input ``(batch, C, H, W)``.
        q, k: queries and keys ``(batch, G, d, H, W)``.
        value, fuse: the module's value and fuse convs (C -> C, 1x1, with bias).
        grid, landmark_weight, solve_iterations: as in :func:`csalr_attention`.

    Returns:
        ``(batch, C, H, W)``: what ``fuse`` returns on the grouped core's output.
    """
    _check_qkv(q, k, q)
    b, g, _, h, w = q.shape
    channels = x.shape[1]
    e = channels // g
    ph, pw = patch_size(grid, h, w)
    _check_landmark_weight(landmark_weight)
    c = float(landmark_weight)
    X, Q, K = x.flatten(2), q.flatten(3), k.flatten(3)  # (batch, C, n), (batch, G, d, n) x 2
    Q_land, K_land = landmarks(q, grid), landmarks(k, grid)  # Q', K': (batch, G, d, m)
    m = Q_land.shape[-1]
    eye = torch.eye(m, dtype=q.dtype, device=q.device)  # (m, m)
    W_v = value.weight.view(g, e, channels)  # group g's rows of the value conv
    W_f = fuse.weight.view(channels, g, e)  # fuse's columns that read group g

    B = torch.softmax(Q_land.mT @ K, dim=-1)  # eq. 13: (batch, G, m, n)
    XB = (X @ B.flatten(1, 2).mT).unflatten(-1, (g, m))  # X B_g^T for every g: (batch, C, G, m)
    E_t = torch.einsum("gec,bcgm->bgem", W_v, XB) + value.bias.view(1, g, e, 1)  # (batch, G, e, m)
    A_mm = landmark_attention(Q_land, K_land) + c * eye  # eq. 16: (batch, G, m, m)
    F = solve_landmarks(A_mm, E_t.mT, solve_iterations)  # A_mm^{-1} E: (batch, G, m, e)
    R = torch.einsum("cge,bgme->bcgm", W_f, F)  # fuse on F's rows, W_f,g F_g^T: (batch, C, G, m)
    # softmax of A_nm (eq. 15), held transposed, S_nm^T: (batch, G, m, n), normalised over m
    S_nm_t = torch.softmax(K_land.mT @ Q, dim=-2)
    # sum_g R_g S_nm,g^T + b_f as one product over the G x m landmark rows: (batch, C, n)
    fused = torch.baddbmm(fuse.bias[:, None], R.flatten(2), S_nm_t.flatten(1, 2))
    fused = fused.view(b, channels, h // ph, ph, w // pw, pw) + c * spread_over_patches(
        R.sum(dim=2), grid, (h, w)
    )  # + sum_g c R_g P^T
    return fused.view(b, channels, h, w)


# --------------------------------------------------------------------------------------------
# CSA: compressed self-attention with learned bases (Chen et al., AAAI 2020), the baseline
# --------------------------------------------------------------------------------------------


@full_precision
def csa_attention(q: Tensor, v: Tensor, bases: Tensor) -> Tensor:
    """CSA per group: ``Y = Wc^T (Ab V)`` with m learned bases in place of keys.

    ``S = 14 cos(base_k, Q_i)``, with every group's bases compared against all C' channels of
    Q (the authors' final CSA code); base maps ``Ab = softmax_n(S)`` pool V into m elementary
    outputs ``Ab V``, and per-pixel weights ``Wc = softmax_m(S)`` mix them back.

    Args:
        q: queries ``(batch, C', H, W)``, shared by the groups.
        v: values ``(batch, G, e, H, W)``.
        bases: base vectors ``(G, m, C')``.

    Returns:
        ``(batch, G, e, H, W)``.
    """
    if q.dim() != 4 or v.dim() != 5 or q.shape[-2:] != v.shape[-2:] or q.shape[0] != v.shape[0]:
        raise ValueError(f"q {tuple(q.shape)} and v {tuple(v.shape)} do not fit CSA's layout")
    if bases.dim() != 3 or bases.shape[0] != v.shape[1] or bases.shape[2] != q.shape[1]:
        raise ValueError(
            f"bases must be (G, m, C') = ({v.shape[1]}, m, {q.shape[1]}), got {tuple(bases.shape)}"
        )
    q_unit = normalize(q.flatten(2), dim=1).unsqueeze(1)  # (batch, 1, C', n)
    S = CSA_SCALE * normalize(bases, dim=-1) @ q_unit  # (batch, G, m, n)
    base_maps = torch.softmax(S, dim=-1)  # Ab, over positions: (batch, G, m, n)
    weights = torch.softmax(S, dim=-2)  # Wc, over bases: (batch, G, m, n)
    elementary = v.flatten(3) @ base_maps.mT  # (Ab V)^T: (batch, G, e, m)
    return (elementary @ weights).unflatten(-1, q.shape[-2:])  # (batch, G, e, H, W)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def pointwise(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The 1x1 conv ``conv`` on ``x`` ``(batch, C, H, W)``, as the matrix product over channels
    that it is.

    Every 1x1 conv of the modules runs this way, so the modules are float32 on every device:
    CUDA runs convolutions in TF32 by default, whose 10-bit mantissa would reach the logits,
    while float32 matrix products stay float32 unless the user asks otherwise.
    """
    b, _, h, w = x.shape
    weight = conv.weight.flatten(1).expand(b, -1, -1)  # (batch, C_out, C), a view
    return torch.baddbmm(conv.bias[:, None], weight, x.flatten(2)).view(b, -1, h, w)


class GroupedAttention(nn.Module):
    """The shell every module shares: 1x1 Q (K) V convs, a grouped core, a 1x1 fuse conv over
    the groups, and the gated residual ``O = I + alpha * fuse(Y)`` (eq. 2 and 17).

    Subclasses implement :meth:`fused_output` (``fuse(Y)``) and :meth:`attention_map`.
    """

    def __init__(self, channels: int, *, groups: int, qk_ratio: float, keys: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        if channels < 1 or groups < 1:
            raise ConfigError(
                f"{name}: channels and groups must be positive, got {channels}, {groups}"
            )
        if not 0 < qk_ratio <= 1:
            raise ConfigError(f"{name}: qk_ratio must lie in (0, 1], got {qk_ratio}")
        qk_channels = round(qk_ratio * channels)
        if channels % groups or qk_channels < groups or qk_channels % groups:
            raise ConfigError(
                f"{name}: channels={channels} and qk_ratio={qk_ratio} give {channels} value and "
                f"{qk_channels} query/key channels; both must split evenly into groups={groups}"
            )
        self.channels = channels
        self.groups = groups
        self.qk_channels = qk_channels
        self.query = nn.Conv2d(channels, qk_channels, 1)
        self.key = nn.Conv2d(channels, qk_channels, 1) if keys else None
        self.value = nn.Conv2d(channels, channels, 1)
        self.fuse = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            for conv in (self.query, self.key):
                if conv is not None:
                    conv.weight.mul_(QK_INIT_SCALE)
                    conv.bias.mul_(QK_INIT_SCALE)
        # eq. 2 / 17: starting at 0 makes the module an identity, so inserting it into a
        # pretrained trunk does not disturb the trunk before the attention has learnt anything.
        self.alpha = nn.Parameter(torch.zeros(()))

    def grouped(self, t: Tensor) -> Tensor:
        """Split channels into contiguous group chunks: ``(batch, c, H, W) -> (batch, G, c/G,
        H, W)``."""
        return t.unflatten(1, (self.groups, -1))

    def queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Grouped Q and K ``(batch, G, d, H, W)`` (:func:`pointwise`)."""
        assert self.key is not None
        return self.grouped(pointwise(x, self.query)), self.grouped(pointwise(x, self.key))

    def fused_output(self, x: Tensor) -> Tensor:
        """``fuse(Y)`` for ``x`` ``(batch, C, H, W)``: the value conv, the grouped core and the
        fuse conv; what :meth:`forward` gates and deep supervision reads."""
        raise NotImplementedError

    def attention_map(self, x: Tensor) -> Tensor:
        """The n x n map each group applies to ``x`` ``(batch, C, H, W)``: ``(batch, G, n, n)``.

        Literal (:mod:`reidkit.models.reference`), for figures and tests: keep inputs small.
        Row i holds the weight each position j gets in position i's output.
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attend over ``x`` ``(batch, C, H, W)``, in float32 even under autocast (see the
        module docstring; the next layer casts back).

        Returns:
            ``(out, fused)``, both ``(batch, C, H, W)``: ``out = x + alpha * fused`` is the gated
            residual (eq. 17), ``fused = fuse(Y)`` what deep supervision multiplies with ``x``
            (eq. 18). The same pair in training and evaluation.
        """
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            fused = self.fused_output(x)  # (batch, C, H, W)
            return torch.addcmul(x, self.alpha, fused), fused  # x + alpha * fused, one pass

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, qk_channels={self.qk_channels}"


class SelfAttention(GroupedAttention):
    """Full self-attention (eq. 1-2), multi-head over channel groups.

    Args:
        channels: input and output channels C.
        groups: groups (heads); the paper runs SA with one.
        qk_ratio: Q and K get ``round(qk_ratio * C)`` channels.
        materialise: hold the n x n map in memory (the paper's cost, for benchmarks) instead
            of the memory-saving SDPA kernel; both give the same result.
    """

    def __init__(
        self, channels: int, *, groups: int = 1, qk_ratio: float = 0.25, materialise: bool = False
    ) -> None:
        super().__init__(channels, groups=groups, qk_ratio=qk_ratio)
        self.materialise = materialise

    def fused_output(self, x: Tensor) -> Tensor:
        q, k = self.queries_keys(x)  # (batch, G, d, H, W)
        v = self.grouped(pointwise(x, self.value))  # (batch, G, C/G, H, W)
        core = full_attention_materialised if self.materialise else full_attention
        return pointwise(core(q, k, v).flatten(1, 2), self.fuse)  # (batch, C, H, W)

    def attention_map(self, x: Tensor) -> Tensor:
        return reference.full_attention_map(*self.queries_keys(x))


class CSA(GroupedAttention):
    """Compressed self-attention with learned bases (Chen et al., AAAI 2020): the baseline.

    A query conv (no key conv) and ``bases`` learned base vectors per group, each of length
    C' (they see all of Q), orthogonally initialised within each group.

    Args:
        channels: input and output channels C.
        groups: groups (heads).
        bases: base vectors per group (m).
        qk_ratio: Q gets ``round(qk_ratio * C)`` channels.
    """

    def __init__(
        self, channels: int, *, groups: int = 2, bases: int = 32, qk_ratio: float = 0.25
    ) -> None:
        super().__init__(channels, groups=groups, qk_ratio=qk_ratio, keys=False)
        if bases < 1:
            raise ConfigError(f"CSA: bases must be positive, got {bases}")
        self.bases = nn.Parameter(torch.empty(groups, bases, self.qk_channels))
        for group_bases in self.bases.data:  # orthogonal within a group, not across groups
            nn.init.orthogonal_(group_bases)

    def fused_output(self, x: Tensor) -> Tensor:
        v = self.grouped(pointwise(x, self.value))  # (batch, G, C/G, H, W)
        q = pointwise(x, self.query)  # (batch, C', H, W): every group's bases see all of Q
        return pointwise(csa_attention(q, v, self.bases).flatten(1, 2), self.fuse)

    def attention_map(self, x: Tensor) -> Tensor:
        return reference.csa_attention_map(pointwise(x, self.query), self.bases)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bases={self.bases.shape[1]}"


Projection = Literal["landmarks", "map"]


class CSALR(GroupedAttention):
    """Compressed self-attention with low-rank approximation (the paper's module, eq. 13-17).

    Args:
        channels: input and output channels C.
        groups: groups (heads); 2 was best in the paper's Table 3.
        grid: landmark grid ``(H', W')``, m = H'W' landmarks per group; 12x8 = 96, the paper's,
            divides the 96x32, 48x16 and 24x8 maps of a 384x128 input.
        qk_ratio: Q and K get ``round(qk_ratio * C)`` channels.
        landmark_weight: the indicator weight c of ``A_nm`` and ``A_mm`` (:data:`LANDMARK_WEIGHT`).
        projection: where the value and fuse convs run: ``"landmarks"`` on the G x m landmark
            rows (:func:`csalr_fused_on_landmarks`, exact and cheaper for few groups) or
            ``"map"`` on the feature map as eq. 17 is written (:func:`csalr_attention`). The
            parameters are the same either way.

    In training, :attr:`landmark_margin` holds the smallest diagonal margin of this batch's
    landmark matrices, ``min (A_kk - sum_{j != k} A_kj) = c - 1 + 2 min s_kk``: by Varah's
    bound every ``||A_mm^{-1}||_inf`` is at most its inverse (see :data:`LANDMARK_WEIGHT`).
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int = 2,
        grid: tuple[int, int] = (12, 8),
        qk_ratio: float = 0.25,
        landmark_weight: float = LANDMARK_WEIGHT,
        projection: Projection = "landmarks",
    ) -> None:
        super().__init__(channels, groups=groups, qk_ratio=qk_ratio)
        _check_landmark_weight(landmark_weight)
        grid = tuple(grid)
        if len(grid) != 2 or not all(isinstance(s, int) and s >= 1 for s in grid):
            raise ConfigError(f"CSALR: grid must be two positive sides (H', W'), got {grid}")
        if projection not in ("landmarks", "map"):
            raise ConfigError(f"CSALR: projection must be landmarks or map, got {projection!r}")
        self.grid: tuple[int, int] = grid
        self.landmark_weight = float(landmark_weight)
        self.projection = projection
        self.landmark_margin: Tensor | None = None
        # None: the landmark solve by LU; a count: by Newton-Schulz steps (ONNX export sets it)
        self.solve_iterations: int | None = None

    def fused_output(self, x: Tensor) -> Tensor:
        q, k = self.queries_keys(x)  # (batch, G, d, H, W)
        if self.training:
            self.landmark_margin = self._smallest_margin(q.detach(), k.detach())
        options = {
            "landmark_weight": self.landmark_weight,
            "solve_iterations": self.solve_iterations,
        }
        if self.projection == "landmarks":
            return csalr_fused_on_landmarks(x, q, k, self.value, self.fuse, self.grid, **options)
        v = self.grouped(pointwise(x, self.value))  # (batch, G, C/G, H, W)
        y = csalr_attention(q, k, v, self.grid, **options)  # (batch, G, C/G, H, W)
        return pointwise(y.flatten(1, 2), self.fuse)  # (batch, C, H, W)

    @torch.no_grad()
    def _smallest_margin(self, q: Tensor, k: Tensor) -> Tensor:
        """``c - 1 + 2 min_k s_kk`` over the batch and groups: a scalar tensor."""
        with torch.autocast(q.device.type, enabled=False):
            probs = landmark_attention(
                landmarks(q.float(), self.grid), landmarks(k.float(), self.grid)
            )
        return self.landmark_weight - 1 + 2 * probs.diagonal(dim1=-2, dim2=-1).amin()

    def attention_map(self, x: Tensor) -> Tensor:
        q, k = self.queries_keys(x)
        return reference.csalr_attention_map(q, k, self.grid, landmark_weight=self.landmark_weight)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, grid={self.grid}, "
            f"landmark_weight={self.landmark_weight:g}, projection={self.projection}"
        )


ATTENTION: dict[str, type[GroupedAttention]] = {
    "sa": SelfAttention,
    "csa": CSA,
    "csalr": CSALR,
}


def build_attention(kind: str, channels: int, **options) -> GroupedAttention:
    """Build the attention module named ``kind`` from :data:`ATTENTION`.

    ``options`` go to the class as keywords; one the class does not take is refused, naming
    the ones it does. Kind ``"none"`` (no attention) is the caller's to handle.

    Raises:
        ConfigError: unknown kind, an option the class does not take, or a value it refuses.
    """
    if kind not in ATTENTION:
        raise ConfigError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION)}")
    cls = ATTENTION[kind]
    accepted = [p for p in inspect.signature(cls).parameters if p != "channels"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"attention {kind!r} takes no {', '.join(unknown)}; its options: {', '.join(accepted)}"
        )
    return cls(channels, **options)
