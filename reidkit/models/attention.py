"""Self-attention modules SA, CSA and CSALR, with a naive reference beside each fast core.

Paper: Chen, Gong, Ge, Du, "Compressed Self-Attention for Deep Metric Learning with Low-Rank
Approximation", IJCAI 2020, section 3.2 (eq. 1-2 and 10-17).

Every functional core works per group on channel-major tensors: ``q`` and ``k`` are
``(B, G, d, H, W)``, ``v`` is ``(B, G, e, H, W)`` and the result is ``(B, G, e, H, W)``, so a
module's grouped 1x1-conv outputs go in, and the fuse conv's input comes out, by reshaping alone.
Like the paper (``exp(Q^T K)``), no core divides the logits by ``sqrt(d)``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reidkit.errors import ConfigError

# CSA's temperature on cosine similarities, as the authors' released CSA code has it: cosines lie
# in [-1, 1], and 14 spreads them far enough for the softmaxes to be selective.
CSA_SCALE = 14.0

# The paper does not say how Q and K start. At PyTorch's default scale, real stage-3 features
# gave logits spread enough that some landmark rows of A_mm = softmax + I put almost no weight
# on their own diagonal: condition numbers over 1,000 at initialisation, outputs 20x those of
# full attention, and training that diverged within a few steps. A tenth of the default scale
# starts every softmax near uniform, where A_mm (about I + 11^T/m) is conditioned about 2; the
# attention sharpens as it learns. Applied to every module so SA, CSA and CSALR start alike.
QK_INIT_SCALE = 0.1


def _check_qkv(q: Tensor, k: Tensor | None, v: Tensor) -> None:
    """Refuse tensors that do not follow the (B, G, channels, H, W) layout of the cores."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and t.dim() != 5:
            raise ValueError(f"{name} must be (B, G, channels, H, W), got shape {tuple(t.shape)}")
    if k is not None and k.shape != q.shape:
        raise ValueError(f"q and k shapes differ: {tuple(q.shape)} vs {tuple(k.shape)}")
    b, g, _, h, w = q.shape
    if (v.shape[0], v.shape[1], v.shape[3], v.shape[4]) != (b, g, h, w):
        raise ValueError(f"v shape {tuple(v.shape)} does not match q shape {tuple(q.shape)}")


def _patch_size(grid: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """Pooling patch (kernel = stride) that turns an H x W map into the H' x W' landmark grid."""
    gh, gw = grid
    if gh < 1 or gw < 1 or height % gh or width % gw:
        raise ConfigError(
            f"landmark grid {gh}x{gw} does not divide the {height}x{width} feature map; "
            f"choose grid sides that divide {height} and {width} (the paper's 12x8 divides "
            "the 96x32, 48x16 and 24x8 maps of a 384x128 input)"
        )
    return height // gh, width // gw


# --------------------------------------------------------------------------------------------
# SA: full self-attention (eq. 1-2)
# --------------------------------------------------------------------------------------------


def full_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full self-attention ``softmax_n(Q K^T) V`` per group, without an n x n matrix.

    Runs through ``scaled_dot_product_attention(..., scale=1.0)``. On CPU only its flash kernel
    avoids the n x n map, and it needs q, k and v of one head width with that dimension
    contiguous, otherwise SDPA falls back silently to the math kernel. So on CPU Q and K (d
    channels) are zero-padded up to V's width e (or V up to d): zero channels add exact zeros
    to every ``Q_i . K_j``, so the logits are unchanged, and zero V channels give output
    channels that are sliced off.

    Measured on the 2-core CPU, torch 2.13, at the stage-1 shape (B=8, 96x32, G=1, d=64,
    e=256), forward+backward, best of 6 (peak = RSS high-water mark above a warmed-up state):
    padded flash 1.00 s and 194 MiB; the math kernel SDPA falls back to unpadded 0.91 s and
    924 MiB; materialised softmax(QK^T) V 1.23 s and 1200 MiB. Padding quadruples the QK^T
    work, so flash is ~10% slower than the math kernel but holds 1/5 of its memory, and the
    memory is what SA at stage 1 runs out of. On CUDA the memory-efficient kernel accepts
    d != e in float32, so nothing is padded there.

    Args:
        q: queries ``(B, G, d, H, W)``.
        k: keys ``(B, G, d, H, W)``.
        v: values ``(B, G, e, H, W)``.

    Returns:
        ``(B, G, e, H, W)``.
    """
    _check_qkv(q, k, v)
    h, w = q.shape[-2:]
    d, e = q.shape[2], v.shape[2]
    q_ = q.flatten(3).transpose(-1, -2)  # (B, G, n, d)
    k_ = k.flatten(3).transpose(-1, -2)  # (B, G, n, d)
    v_ = v.flatten(3).transpose(-1, -2)  # (B, G, n, e)
    if q.device.type == "cpu" and d != e:
        width = max(d, e)
        # F.pad writes a fresh contiguous tensor: the padding costs no copy beyond the
        # transpose-to-contiguous that flash needs anyway.
        q_ = F.pad(q_, (0, width - d))  # (B, G, n, width)
        k_ = F.pad(k_, (0, width - d))  # (B, G, n, width)
        v_ = F.pad(v_, (0, width - e))  # (B, G, n, width)
    y = F.scaled_dot_product_attention(
        q_.contiguous(), k_.contiguous(), v_.contiguous(), scale=1.0
    )  # (B, G, n, width)
    y = y[..., :e]  # (B, G, n, e)
    return y.transpose(-1, -2).unflatten(-1, (h, w))  # (B, G, e, H, W)


def full_attention_materialised(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full self-attention with the n x n map held in memory: the paper's cost, for benchmarks.

    Same arguments and result as :func:`full_attention`.
    """
    _check_qkv(q, k, v)
    h, w = q.shape[-2:]
    attn = torch.matmul(q.flatten(3).transpose(-1, -2), k.flatten(3))  # (B, G, n, n)
    attn = attn.softmax(dim=-1)  # (B, G, n, n), rows over keys j
    # Channel-major product Y^T = V^T A^T keeps the result in the (e, n) layout the fuse conv
    # reads, with no transpose of the output.
    y = torch.matmul(v.flatten(3), attn.transpose(-1, -2))  # (B, G, e, n)
    return y.unflatten(-1, (h, w))  # (B, G, e, H, W)


def _softmax_reference(logits: Tensor, dim: int) -> Tensor:
    """Softmax written out as exp / sum, independent of torch.softmax."""
    z = torch.exp(logits - logits.amax(dim=dim, keepdim=True))
    return z / z.sum(dim=dim, keepdim=True)


def full_attention_map(q: Tensor, k: Tensor) -> Tensor:
    """The n x n full attention map ``softmax_n(Q K^T)`` (eq. 10) per group: ``(B, G, n, n)``."""
    return _softmax_reference(
        torch.einsum("bgdi,bgdj->bgij", q.flatten(3), k.flatten(3)), dim=-1
    )  # (B, G, n, n)


def full_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Naive full self-attention straight from eq. 1: materialise ``A_nn``, then ``A_nn V``."""
    _check_qkv(q, k, v)
    attn = full_attention_map(q, k)  # (B, G, n, n)
    y = torch.einsum("bgij,bgej->bgei", attn, v.flatten(3))  # (B, G, e, n)
    return y.unflatten(-1, q.shape[-2:])  # (B, G, e, H, W)


# --------------------------------------------------------------------------------------------
# CSALR: compressed self-attention with low-rank approximation (eq. 13-17)
# --------------------------------------------------------------------------------------------


def _landmark_solve(q_land: Tensor, k_land: Tensor, e_t: Tensor) -> Tensor:
    """``F = A_mm^{-1} E`` with ``A_mm = softmax_m(Q' K'^T) + I`` (eq. 16), by LU, never inv().

    Everything here is m x m or m x e, so it runs in float32 at least and outside autocast: in
    bfloat16/float16 the softmax rows would keep 3 digits before the solve, and the CPU has no
    half-precision LU at all. Float64 inputs stay float64.

    Args:
        q_land: landmark queries ``(BG, d, m)``.
        k_land: landmark keys ``(BG, d, m)``.
        e_t: landmark output, transposed, ``(BG, e, m)``.

    Returns:
        ``F`` ``(BG, m, e)`` in ``e_t``'s dtype.
    """
    dtype = torch.promote_types(e_t.dtype, torch.float32)
    m = q_land.shape[-1]
    with torch.autocast(device_type=e_t.device.type, enabled=False):
        q_land, k_land = q_land.to(dtype), k_land.to(dtype)
        a_mm = torch.bmm(q_land.transpose(1, 2), k_land).softmax(dim=-1)  # (BG, m, m)
        # Row k: a softmax row plus 1 on the diagonal, so strictly diagonally dominant and the
        # LU solve always exists.
        a_mm = a_mm + torch.eye(m, dtype=dtype, device=a_mm.device)  # (BG, m, m)
        f = torch.linalg.solve(a_mm, e_t.to(dtype).transpose(1, 2))  # (BG, m, e)
    return f.to(e_t.dtype)


def csalr_attention(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
    """CSALR per group: ``Y = A_nm A_mm^{-1} B V`` (eq. 14-17), re-associated.

    With landmarks ``Q', K'`` (average pooling over ``grid``, m = H'W'):
    ``E = B V`` with ``B = softmax_n(Q' K^T)``, ``F = A_mm^{-1} E`` with
    ``A_mm = softmax_m(Q' K'^T) + I``, and ``Y = softmax_m(Q K'^T) F + P F`` where ``P F``
    copies each landmark's row of F to every position of its pooling patch. Neither
    ``W = A_nm A_mm^{-1}`` nor any n x n matrix is formed: the largest tensors are the two
    (m x n) attention blocks, and they are the only large tensors autograd saves.

    Measured on the 2-core CPU (B=8, 96x32, G=2, d=32, e=128, 12x8 grid, forward+backward):
    74 ms and 127 MiB peak, against 1.23 s and 1200 MiB for materialised SA at G=1.

    Args:
        q: queries ``(B, G, d, H, W)``.
        k: keys ``(B, G, d, H, W)``.
        v: values ``(B, G, e, H, W)``.
        grid: landmark grid ``(H', W')``; it must divide ``(H, W)``.

    Returns:
        ``(B, G, e, H, W)``.

    Raises:
        ConfigError: the grid does not divide the feature map.
    """
    _check_qkv(q, k, v)
    b, g, d, h, w = q.shape
    e = v.shape[2]
    gh, gw = grid
    ph, pw = _patch_size(grid, h, w)
    n = h * w
    q2 = q.reshape(b * g, d, h, w)  # (BG, d, H, W)
    k2 = k.reshape(b * g, d, h, w)  # (BG, d, H, W)
    q_land = F.avg_pool2d(q2, (ph, pw)).flatten(2)  # (BG, d, m)
    k_land = F.avg_pool2d(k2, (ph, pw)).flatten(2)  # (BG, d, m)

    # Landmark attention B = softmax_n(Q' K^T) and landmark output E^T = V^T B^T.
    landmark_map = torch.bmm(q_land.transpose(1, 2), k2.flatten(2)).softmax(dim=-1)  # (BG, m, n)
    e_t = torch.bmm(v.reshape(b * g, e, n), landmark_map.transpose(1, 2))  # (BG, e, m)

    f = _landmark_solve(q_land, k_land, e_t)  # F = A_mm^{-1} E: (BG, m, e)

    # Y^T = F^T softmax_m(Q K'^T)^T, then + (P F)^T. Softmax over the last (m) dimension is
    # 2-3x faster on CPU than over a strided one, and bmm takes the transposed operand as is.
    coeff = torch.bmm(q2.flatten(2).transpose(1, 2), k_land).softmax(dim=-1)  # (BG, n, m)
    y = torch.bmm(f.transpose(1, 2), coeff.transpose(1, 2))  # (BG, e, n)
    # P F: each landmark's row of F, broadcast over its ph x pw patch (an expand, never an
    # n x m indicator nor an upsampled copy of F). Out of place on purpose: an in-place add into
    # a view of y makes autograd clone the whole gradient twice in backward (CopySlices).
    patch_f = f.transpose(1, 2).reshape(b * g, e, gh, 1, gw, 1)  # (BG, e, H', 1, W', 1)
    y = y.view(b * g, e, gh, ph, gw, pw) + patch_f  # (BG, e, H', ph, W', pw)
    return y.view(b, g, e, h, w)  # (B, G, e, H, W)


def _pool_reference(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Average pooling with kernel = stride = patch, written as a reshape and a mean."""
    b, g, c, h, w = x.shape
    gh, gw = grid
    ph, pw = _patch_size(grid, h, w)
    patches = x.reshape(b, g, c, gh, ph, gw, pw)  # (B, G, c, H', ph, W', pw)
    return patches.mean(dim=(4, 6)).flatten(3)  # (B, G, c, m)


def _patch_indicator(h: int, w: int, grid: tuple[int, int], like: Tensor) -> Tensor:
    """The n x m indicator P of eq. 15: ``P[i, k] = 1`` iff position i lies in pooling patch k."""
    gh, gw = grid
    ph, pw = _patch_size(grid, h, w)
    rows = torch.arange(h, device=like.device).repeat_interleave(w)  # (n,) row of position i
    cols = torch.arange(w, device=like.device).repeat(h)  # (n,) column of position i
    patch = (rows // ph) * gw + cols // pw  # (n,) index k of i's patch, row-major in the grid
    landmarks = torch.arange(gh * gw, device=like.device)  # (m,)
    return (patch[:, None] == landmarks[None, :]).to(like.dtype)  # (n, m)


def _csalr_blocks(q: Tensor, k: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """The literal blocks ``A_nm`` (eq. 15), ``A_mm`` (eq. 16) and ``B = A_mn`` (eq. 13)."""
    h, w = q.shape[-2:]
    q_, k_ = q.flatten(3), k.flatten(3)  # (B, G, d, n)
    q_land, k_land = _pool_reference(q, grid), _pool_reference(k, grid)  # (B, G, d, m)
    m = q_land.shape[-1]
    indicator = _patch_indicator(h, w, grid, q)  # (n, m)
    eye = torch.eye(m, dtype=q.dtype, device=q.device)  # (m, m): 1(Q'_i, K'_j)
    a_nm = _softmax_reference(torch.einsum("bgdi,bgdk->bgik", q_, k_land), -1)  # (B, G, n, m)
    a_mm = _softmax_reference(torch.einsum("bgdl,bgdk->bglk", q_land, k_land), -1)  # (B, G, m, m)
    landmark_map = _softmax_reference(torch.einsum("bgdk,bgdj->bgkj", q_land, k_), -1)  # (.., m, n)
    return a_nm + indicator, a_mm + eye, landmark_map


def csalr_attention_reference(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
    """Naive CSALR straight from eq. 13-17: literal ``A_nm``, ``A_mm``, ``B``, ``W`` (float64-able).

    ``W = A_nm A_mm^{-1}`` is formed with an explicit inverse, then ``Y_i = sum_k W_ik E_k``
    with ``E = B V`` (eq. 17).
    """
    _check_qkv(q, k, v)
    a_nm, a_mm, landmark_map = _csalr_blocks(q, k, grid)
    coeff = a_nm @ torch.linalg.inv(a_mm)  # W: (B, G, n, m)
    e_land = torch.einsum("bgkj,bgej->bgke", landmark_map, v.flatten(3))  # E: (B, G, m, e)
    y = torch.einsum("bgik,bgke->bgei", coeff, e_land)  # (B, G, e, n)
    return y.unflatten(-1, q.shape[-2:])  # (B, G, e, H, W)


def csalr_attention_map(q: Tensor, k: Tensor, grid: tuple[int, int]) -> Tensor:
    """The reconstructed n x n attention map ``W B = A_nm A_mm^{-1} B`` (eq. 14) per group.

    For tests, the paper's approximation claim and attention figures: it materialises n x n,
    so keep inputs small. Every row sums to 1, as ``A_nm 1 = A_mm 1 = 2 * 1`` and ``B 1 = 1``.

    Returns:
        ``(B, G, n, n)``.
    """
    _check_qkv(q, k, k)
    a_nm, a_mm, landmark_map = _csalr_blocks(q, k, grid)
    return a_nm @ torch.linalg.solve(a_mm, landmark_map)  # (B, G, n, n)


# --------------------------------------------------------------------------------------------
# CSA: compressed self-attention with learned bases (Chen et al., AAAI 2020), the baseline
# --------------------------------------------------------------------------------------------


def csa_attention(q: Tensor, v: Tensor, bases: Tensor) -> Tensor:
    """CSA per group: ``Y = Wc^T (Ab V)`` with m learned base vectors in place of keys.

    ``S = 14 cos(base_k, Q_i)``; base maps ``Ab = softmax_n(S)`` pool V into m elementary
    outputs ``E = Ab V``; per-pixel weights ``Wc = softmax_m(S)`` mix them back.

    Args:
        q: queries ``(B, G, d, H, W)``.
        v: values ``(B, G, e, H, W)``.
        bases: base vectors ``(G, m, d)``.

    Returns:
        ``(B, G, e, H, W)``.
    """
    _check_qkv(q, None, v)
    if bases.dim() != 3 or bases.shape[0] != q.shape[1] or bases.shape[2] != q.shape[2]:
        raise ValueError(
            f"bases must be (G, m, d) = ({q.shape[1]}, m, {q.shape[2]}), got {tuple(bases.shape)}"
        )
    h, w = q.shape[-2:]
    q_unit = F.normalize(q.flatten(3), dim=2)  # (B, G, d, n)
    bases_unit = F.normalize(bases, dim=-1)  # (G, m, d)
    sim = CSA_SCALE * torch.matmul(bases_unit, q_unit)  # (B, G, m, n)
    base_maps = sim.softmax(dim=-1)  # Ab: (B, G, m, n), over positions
    weights = sim.softmax(dim=-2)  # Wc: (B, G, m, n), over bases
    e_t = torch.matmul(v.flatten(3), base_maps.transpose(-1, -2))  # E^T: (B, G, e, m)
    return torch.matmul(e_t, weights).unflatten(-1, (h, w))  # (B, G, e, H, W)


def csa_attention_map(q: Tensor, bases: Tensor) -> Tensor:
    """CSA's effective n x n attention map ``Wc^T Ab`` per group: ``(B, G, n, n)``."""
    q_ = q.flatten(3)  # (B, G, d, n)
    dots = torch.einsum("gkd,bgdi->bgki", bases, q_)  # (B, G, m, n)
    norms = bases.norm(dim=-1)[None, :, :, None] * q_.norm(dim=2)[:, :, None, :]  # (B, G, m, n)
    sim = CSA_SCALE * dots / norms  # (B, G, m, n)
    base_maps = _softmax_reference(sim, -1)  # (B, G, m, n)
    weights = _softmax_reference(sim, -2)  # (B, G, m, n)
    return torch.einsum("bgki,bgkj->bgij", weights, base_maps)  # (B, G, n, n)


def csa_attention_reference(q: Tensor, v: Tensor, bases: Tensor) -> Tensor:
    """Naive CSA: literal cosines, both softmaxes, ``E = Ab V`` then ``Y_i = sum_k Wc_ki E_k``."""
    _check_qkv(q, None, v)
    q_ = q.flatten(3)  # (B, G, d, n)
    dots = torch.einsum("gkd,bgdi->bgki", bases, q_)  # (B, G, m, n)
    norms = bases.norm(dim=-1)[None, :, :, None] * q_.norm(dim=2)[:, :, None, :]  # (B, G, m, n)
    sim = CSA_SCALE * dots / norms  # (B, G, m, n)
    e_land = torch.einsum("bgkj,bgej->bgke", _softmax_reference(sim, -1), v.flatten(3))
    y = torch.einsum("bgki,bgke->bgei", _softmax_reference(sim, -2), e_land)  # (B, G, e, n)
    return y.unflatten(-1, q.shape[-2:])  # (B, G, e, H, W)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class _GroupedAttention(nn.Module):
    """Shared shell: 1x1 Q/(K)/V convs, grouped core, 1x1 fuse conv, gated residual (eq. 2, 17).

    Subclasses implement :meth:`_attend` (grouped ``q, k, v`` -> ``(B, G, e, H, W)``) and
    :meth:`_map` (grouped ``q, k`` -> ``(B, G, n, n)``).
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

    def _grouped(self, t: Tensor) -> Tensor:
        """Split channels into contiguous group chunks: ``(B, c, H, W) -> (B, G, c/G, H, W)``."""
        return t.unflatten(1, (self.groups, -1))  # (B, G, c/G, H, W)

    def _queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        q = self._grouped(self.query(x))  # (B, G, d, H, W)
        k = self._grouped(self.key(x)) if self.key is not None else None  # (B, G, d, H, W)
        return q, k

    def _attend(self, q: Tensor, k: Tensor | None, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _map(self, q: Tensor, k: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attend over ``x`` ``(B, C, H, W)``.

        Returns:
            ``(out, fused)``, both ``(B, C, H, W)``: ``out = x + alpha * fused`` is the gated
            residual output, ``fused = fuse(Y)`` the fused attention output that deep
            supervision (eq. 18) multiplies with ``x``. Same pair in training and evaluation.
        """
        q, k = self._queries_keys(x)
        v = self._grouped(self.value(x))  # (B, G, C/G, H, W)
        y = self._attend(q, k, v)  # (B, G, C/G, H, W)
        fused = self.fuse(y.flatten(1, 2))  # (B, C, H, W)
        # Plain mul + add on purpose: addcmul saves one forward temporary but its backward makes
        # two extra full-size copies (grad * value), right at the module's memory peak.
        out = x + self.alpha * fused
        return out, fused

    def attention_map(self, x: Tensor) -> Tensor:
        """The n x n attention map each group applies to ``x`` ``(B, C, H, W)``: ``(B, G, n, n)``.

        For visualisation; it materialises n x n per group, so use small inputs. Row i is the
        weight each position j gets in position i's output.
        """
        q, k = self._queries_keys(x)
        return self._map(q, k)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, qk_channels={self.qk_channels}"


class SelfAttention(_GroupedAttention):
    """Full self-attention module (SAGAN-style, eq. 1-2), multi-head over channel groups.

    Args:
        channels: input and output channels C.
        groups: number of groups (heads).
        qk_ratio: Q and K get ``round(qk_ratio * C)`` channels.
        materialise: hold the n x n map in memory (the paper's cost, for benchmarks) instead of
            the memory-saving SDPA kernel; both give the same result.
    """

    def __init__(
        self, channels: int, *, groups: int = 1, qk_ratio: float = 0.25, materialise: bool = False
    ) -> None:
        super().__init__(channels, groups=groups, qk_ratio=qk_ratio)
        self.materialise = materialise

    def _attend(self, q: Tensor, k: Tensor | None, v: Tensor) -> Tensor:
        assert k is not None
        core = full_attention_materialised if self.materialise else full_attention
        return core(q, k, v)

    def _map(self, q: Tensor, k: Tensor | None) -> Tensor:
        assert k is not None
        return full_attention_map(q, k)


class CSA(_GroupedAttention):
    """Compressed self-attention with learned bases (Chen et al., AAAI 2020): the baseline.

    A query conv (no key conv) and ``bases`` learned base vectors per group, orthogonally
    initialised.

    Args:
        channels: input and output channels C.
        groups: number of groups (heads).
        bases: base vectors per group (m).
        qk_ratio: Q gets ``round(qk_ratio * C)`` channels.
    """

    def __init__(
        self, channels: int, *, groups: int = 2, bases: int = 32, qk_ratio: float = 0.25
    ) -> None:
        super().__init__(channels, groups=groups, qk_ratio=qk_ratio, keys=False)
        if bases < 1:
            raise ConfigError(f"CSA: bases must be positive, got {bases}")
        self.bases = nn.Parameter(torch.empty(groups, bases, self.qk_channels // groups))
        for group_bases in self.bases.data:  # orthogonal per group, not across the G x m rows
            nn.init.orthogonal_(group_bases)

    def _attend(self, q: Tensor, k: Tensor | None, v: Tensor) -> Tensor:
        return csa_attention(q, v, self.bases)

    def _map(self, q: Tensor, k: Tensor | None) -> Tensor:
        return csa_attention_map(q, self.bases)


class CSALR(_GroupedAttention):
    """Compressed self-attention with low-rank approximation (the paper's module, eq. 13-17).

    Args:
        channels: input and output channels C.
        groups: number of groups (heads); 2 was best in the paper's Table 3.
        grid: landmark grid ``(H', W')``, m = H'W' landmarks per group; 12x8 = 96 landmarks,
            as in the paper, divides the 96x32, 48x16 and 24x8 maps of a 384x128 input.
        qk_ratio: Q and K get ``round(qk_ratio * C)`` channels.
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int = 2,
        grid: tuple[int, int] = (12, 8),
        qk_ratio: float = 0.25,
    ) -> None:
        super().__init__(channels, groups=groups, qk_ratio=qk_ratio)
        grid = tuple(grid)
        if len(grid) != 2 or not all(isinstance(s, int) and s >= 1 for s in grid):
            raise ConfigError(f"CSALR: grid must be two positive sides (H', W'), got {grid}")
        self.grid: tuple[int, int] = grid

    def _attend(self, q: Tensor, k: Tensor | None, v: Tensor) -> Tensor:
        assert k is not None
        return csalr_attention(q, k, v, self.grid)

    def _map(self, q: Tensor, k: Tensor | None) -> Tensor:
        assert k is not None
        return csalr_attention_map(q, k, self.grid)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.grid}"


ATTENTION: dict[str, type[_GroupedAttention]] = {
    "sa": SelfAttention,
    "csa": CSA,
    "csalr": CSALR,
}


def build_attention(
    kind: str,
    channels: int,
    *,
    groups: int | None = None,
    grid: tuple[int, int] | None = None,
    qk_ratio: float | None = None,
    bases: int | None = None,
) -> nn.Module:
    """Build the attention module named ``kind`` from :data:`ATTENTION`.

    Each class gets only the options it takes (SA ignores ``grid`` and ``bases``, CSA ignores
    ``grid``, CSALR ignores ``bases``); an option left as None keeps the class default. Kind
    ``"none"`` (no attention) is the caller's to handle.

    Raises:
        ConfigError: unknown kind, or options the module refuses.
    """
    if kind not in ATTENTION:
        raise ConfigError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION)}")
    cls = ATTENTION[kind]
    options = {"groups": groups, "grid": grid, "qk_ratio": qk_ratio, "bases": bases}
    accepted = inspect.signature(cls).parameters
    return cls(channels, **{k: v for k, v in options.items() if v is not None and k in accepted})
