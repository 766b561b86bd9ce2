"""The attention modules as they were before the plain-autograd rewrite (reidkit commit acdc2d4).

Kept only so that `bench/attention.py` and `bench/model.py` can time the old hand-written
autograd Functions beside the plain-autograd modules of `reidkit.models.attention`, side by
side in one run. Nothing in `reidkit/` imports this file and it is not maintained; the
modules keep the state-dict names of today's, so the same weights load into both.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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


# The m x n landmark blocks are formed for a slice of the batch (x group) axis at a time, in
# forward and again in backward, holding at most this many elements per block (4 MiB in
# float32: 3 group-images at the stage-1 shape, 96x32 with m = 96). On the 2-core CPU
# (torch 2.13, stage 1, batch 8, 2 groups) the core's forward+backward took 82 ms with
# slices of 2^20 elements, 84 with 2^22 and 86 with 2^23: smaller slices stay in cache
# between the products that share them, and hold less.
CSALR_BLOCK_ELEMENTS = 1 << 20

# The weight c of the indicator terms 1(.) in eq. 15-16: A_nm = softmax_m(Q K'^T) + c P and
# A_mm = softmax_m(Q' K'^T) + c I. The paper's c = 1 makes row k of A_mm dominant only by
# 2 s_kk (its own softmax weight), so once a landmark attends away from itself A_mm nears
# singular: by Varah's bound ||A_mm^-1||_inf <= 1 / (c - 1 + 2 min_k s_kk), which c = 1
# leaves unbounded. Trained from scratch at lr 0.05 on the 2-core CPU, its condition number
# reached 2e16 and the solve failed at epoch 3; with c = 2 (bound 1) the same run trained 8
# epochs to 90% training accuracy. Any c keeps each row of W = A_nm A_mm^-1 summing to 1 and
# the approximation exact when every position is a landmark; the reconstruction error of a
# random map barely moves (96 landmarks at 48x16: 0.509 with c = 1, 0.530 with c = 2).
LANDMARK_WEIGHT = 1.0


def _check_landmark_weight(weight: float) -> None:
    """Refuse ``c < 1``: below it A_mm is no longer diagonally dominant by construction."""
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 1):
        raise ConfigError(
            f"CSALR: landmark_weight must be a number >= 1 (1 is the paper's), got {weight!r}"
        )


def _chunks(length: int, block: int) -> list[slice]:
    """Near-equal slices of ``range(length)`` whose ``block``-element items fit the budget."""
    count = math.ceil(length / max(1, CSALR_BLOCK_ELEMENTS // block))  # slices needed
    size = math.ceil(length / count)  # as even as they can be, none above the budget
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype autocast would run a product of these float tensors in, or their common one.

    The block Functions below run with autocast off and cast their operands to this dtype
    themselves, so forward and the backward recomputation see the same blocks.
    """
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device) and all(t.dtype != torch.float64 for t in tensors):
        return torch.get_autocast_dtype(device)  # autocast casts float32 (not 64) operands
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _bmm_into(out: Tensor, a: Tensor, b: Tensor, *, add: bool = False) -> None:
    """``out = a @ b`` (``out += a @ b`` with `add`), in place when the dtypes allow."""
    if out.dtype == a.dtype == b.dtype and out.is_contiguous():
        if add:
            out.baddbmm_(a, b)
        else:
            torch.bmm(a, b, out=out)
    elif add:
        out += torch.bmm(a, b)
    else:
        out.copy_(torch.bmm(a, b))


def _softmax_backward_(grad: Tensor, prob: Tensor) -> Tensor:
    """Gradient w.r.t. the logits of ``prob = softmax(logits, -1)``: ``p * (g - sum_j p_j g_j)``.

    Autograd's own softmax-backward kernel, written over ``grad`` on the CPU (the kernel reads
    a row before it writes it; tests hold it to autograd's result), so a recomputed block
    needs no second block-sized tensor; elsewhere into a new tensor.
    """
    if grad.device.type == "cpu":
        return torch._softmax_backward_data(grad, prob, -1, prob.dtype, grad_input=grad)
    return torch._softmax_backward_data(grad, prob, -1, prob.dtype)


def _add_indicator_(
    coeff: Tensor, grid: tuple[int, int], size: tuple[int, int], weight: float = 1.0
) -> Tensor:
    """``coeff + c P`` in place: ``c = weight`` added at (position i, the landmark whose patch
    holds i).

    ``coeff`` is ``(c, n, m)`` over an ``H x W`` map (positions and landmarks row-major); the
    n touched entries are a strided view of it, two diagonals of its 7-d form. Folding P
    into the coefficients makes ``(softmax_m(Q K'^T) + P) F = A_nm F`` one product, with no
    pass over the output; in bfloat16 it rounds that one entry per row to 2^-8 of 1, below
    the rounding of the output itself.
    """
    (gh, gw), (h, w) = grid, size
    blocks = coeff.view(-1, gh, h // gh, gw, w // gw, gh, gw)  # (c, H', ph, W', pw, H', W')
    rows = blocks.diagonal(dim1=1, dim2=5)  # (c, ph, W', pw, W', H')
    rows.diagonal(dim1=2, dim2=4).add_(weight)  # (c, ph, pw, H', W'): entry (i, patch(i))
    return coeff


def _spread_add_(target: Tensor, rows: Tensor, grid: tuple[int, int], size: tuple[int, int]):
    """``target += rows P^T`` in place: each landmark's row added over its ph x pw patch.

    ``target`` is ``(c, k, n)``, ``rows`` ``(c, k, m)``. Repeating each row along the patch
    width first lets the add broadcast over whole image rows: 4x faster on the CPU than a
    6-d broadcast whose innermost dimension is the patch width.
    """
    (gh, gw), (h, w) = grid, size
    c, k = rows.shape[:2]
    wide = rows.reshape(c * k * gh, 1, gw).repeat_interleave(w // gw, dim=-1)  # (ckH', 1, W)
    target.view(c * k * gh, h // gh, w).add_(wide)  # (ckH', ph, W)


def _pool(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Average pooling of ``x`` ``(N, c, H, W)`` over the grid's patches: ``(N, c, m)``.

    Rows of each patch first (a contiguous reduction), then columns: on the 2-core CPU half
    the time of ``avg_pool2d`` at the stage-1 shape. Autograd-friendly (views and sums).
    """
    n, c, h, w = x.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    rows = x.reshape(n * c * gh, ph, w).sum(dim=1)  # (N c H', W): each patch's rows summed
    return rows.view(n, c, gh * gw, pw).sum(dim=-1) / (ph * pw)  # (N, c, m)


def _landmark_map(q_land: Tensor, k: Tensor) -> Tensor:
    """``B = softmax_n(Q' K^T)``: landmarks ``(c, d, m)``, keys ``(c, d, n)`` -> ``(c, m, n)``."""
    return torch.bmm(q_land.transpose(1, 2), k).softmax(dim=-1)


def _coefficients(q: Tensor, k_land: Tensor) -> Tensor:
    """``softmax_m(Q K'^T)``: queries ``(c, d, n)``, landmarks ``(c, d, m)`` -> ``(c, n, m)``.

    Softmax over the last (m) dimension is 2-3x faster on CPU than over a strided one, and bmm
    takes the transposed operand as is.
    """
    return torch.bmm(q.transpose(1, 2), k_land).softmax(dim=-1)


def _landmark_probs(q_land: Tensor, k_land: Tensor) -> Tensor:
    """``softmax_m(Q' K'^T)`` ``(BG, m, m)``, in float32 at least and outside autocast."""
    dtype = torch.promote_types(q_land.dtype, torch.float32)
    with torch.autocast(device_type=q_land.device.type, enabled=False):
        logits = torch.bmm(q_land.to(dtype).transpose(1, 2), k_land.to(dtype))  # (BG, m, m)
        return logits.softmax(dim=-1)


def _landmark_solve(
    probs: Tensor, rhs: Tensor, *, weight: float = 1.0, transpose: bool = False
) -> Tensor:
    """``A_mm^{-1} rhs`` (or ``A_mm^{-T} rhs``) with ``A_mm = probs + c I`` (eq. 16), by LU.

    Everything here is m x m or m x e, so it runs in float32 at least and outside autocast: in
    bfloat16/float16 the softmax rows would keep 3 digits before the solve, and the CPU has no
    half-precision LU at all. Float64 inputs stay float64. Never inv(): row k of ``A_mm`` is a
    softmax row plus ``c >= 1`` on the diagonal, so strictly diagonally dominant, and LU
    always works in exact arithmetic (see :data:`LANDMARK_WEIGHT` for how close to singular
    ``c = 1`` can get).

    Args:
        probs: ``softmax_m(Q' K'^T)`` ``(BG, m, m)`` from :func:`_landmark_probs`.
        rhs: right-hand sides ``(BG, m, e)``.
        weight: the indicator weight ``c`` (:data:`LANDMARK_WEIGHT`).
        transpose: solve with ``A_mm^T`` (a backward pass).

    Returns:
        ``(BG, m, e)`` in ``probs``' dtype.
    """
    m = probs.shape[-1]
    with torch.autocast(device_type=probs.device.type, enabled=False):
        eye = torch.eye(m, dtype=probs.dtype, device=probs.device)  # (m, m)
        a_mm = probs + weight * eye  # (BG, m, m)
        return torch.linalg.solve(a_mm.mT if transpose else a_mm, rhs.to(probs.dtype))


class _CSALRCore(torch.autograd.Function):
    """The CSALR core ``Y = (softmax_m(Q K'^T) + P) F``, recomputing its m x n blocks.

    Autograd through the plain re-associated form keeps both m x n blocks (``B`` and
    ``softmax_m(Q K'^T)``) from forward to backward, and adds their gradients beside them in
    backward. Here forward saves only q, k, v (which the module's convs hold anyway) and
    m x m / m x e tensors; both passes form the blocks one slice of the batch x group axis
    at a time (:data:`CSALR_BLOCK_ELEMENTS`), softmax backward runs in place, and P is
    added into the coefficient block (:func:`_add_indicator_`) instead of a pass over Y. The
    math is the plain form's, so values and gradients agree to rounding.

    Under autocast the products run in its dtype, in backward too (the recomputed blocks are
    the ones forward used); the landmark solve stays in float32. Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], weight: float
    ) -> Tensor:
        b, g, d, h, w = q.shape
        e = v.shape[2]
        gh, gw = grid
        bg, n, m = b * g, h * w, gh * gw
        ct = _compute_dtype(q, k, v)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q2 = q.reshape(bg, d, n)  # (BG, d, n)
            k2 = k.reshape(bg, d, n)  # (BG, d, n)
            v2 = v.reshape(bg, e, n)  # (BG, e, n)
            q_land = _pool(q2.view(bg, d, h, w), grid)  # (BG, d, m)
            k_land = _pool(k2.view(bg, d, h, w), grid)  # (BG, d, m)
            chunks = _chunks(bg, m * n)

            # E^T = V^T B^T with B = softmax_n(Q' K^T), one slice of B at a time.
            e_t = torch.empty((bg, e, m), dtype=ct, device=q.device)  # (BG, e, m)
            for s in chunks:
                landmark_map = _landmark_map(q_land[s].to(ct), k2[s].to(ct))  # (c, m, n)
                torch.bmm(v2[s].to(ct), landmark_map.transpose(1, 2), out=e_t[s])
            probs = _landmark_probs(q_land, k_land)  # (BG, m, m), float32 at least
            f_wide = _landmark_solve(probs, e_t.transpose(1, 2), weight=weight)  # F: (BG, m, e)
            f = f_wide.to(ct)  # (BG, m, e)

            # Y^T = F^T A_nm^T with A_nm = softmax_m(Q K'^T) + c P, slice by slice.
            y = torch.empty((bg, e, n), dtype=ct, device=q.device)  # (BG, e, n)
            for s in chunks:
                coeff = _coefficients(q2[s].to(ct), k_land[s].to(ct))  # (c, n, m)
                a_nm = _add_indicator_(coeff, grid, (h, w), weight)  # (c, n, m)
                torch.bmm(f[s].transpose(1, 2), a_nm.transpose(1, 2), out=y[s])  # (c, e, n)

        ctx.save_for_backward(q, k, v, q_land, k_land, probs, f_wide)
        ctx.grid, ctx.ct, ctx.weight = grid, ct, weight
        return y.view(b, g, e, h, w)  # (B, G, e, H, W)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, q_land, k_land, probs, f_wide = ctx.saved_tensors
        ct, grid, weight = ctx.ct, ctx.grid, ctx.weight
        b, g, d, h, w = q.shape
        e = v.shape[2]
        gh, gw = grid
        ph, pw = h // gh, w // gw
        bg, n, m = b * g, h * w, gh * gw
        wide = probs.dtype
        chunks = _chunks(bg, m * n)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q2 = q.reshape(bg, d, n)  # (BG, d, n)
            k2 = k.reshape(bg, d, n)  # (BG, d, n)
            v2 = v.reshape(bg, e, n)  # (BG, e, n)
            gy = grad_y.reshape(bg, e, n)  # (BG, e, n): dL/dY^T
            f = f_wide.to(ct)  # (BG, m, e), as forward used it
            d_f_t = torch.empty((bg, e, m), dtype=wide, device=q.device)  # (BG, e, m)
            dq = torch.empty((bg, d, n), dtype=q.dtype, device=q.device)  # (BG, d, n)
            dk_land = torch.empty((bg, d, m), dtype=wide, device=q.device)  # (BG, d, m)
            for s in chunks:
                gys = gy[s].to(ct)  # (c, e, n)
                ql, kl = q2[s].to(ct), k_land[s].to(ct)  # (c, d, n), (c, d, m)
                coeff = _coefficients(ql, kl)  # C: (c, n, m), recomputed
                d_coeff = torch.bmm(gys.transpose(1, 2), f[s].transpose(1, 2))  # dC: (c, n, m)
                d_logits = _softmax_backward_(d_coeff, coeff)  # (c, n, m)
                _bmm_into(dq[s], kl, d_logits.transpose(1, 2))  # dQ = K' dL^T: (c, d, n)
                _bmm_into(dk_land[s], ql, d_logits)  # dK' = Q dL: (c, d, m)
                del d_coeff, d_logits
                a_nm = _add_indicator_(coeff, grid, (h, w), weight)  # A_nm, over C (used above)
                _bmm_into(d_f_t[s], gys, a_nm)  # dF^T = dY^T A_nm: (c, e, m)
                del coeff, a_nm

            # F = A_mm^{-1} E: dE = A_mm^{-T} dF and dA_mm = -dE F^T, all m x m / m x e.
            d_e = _landmark_solve(probs, d_f_t.transpose(1, 2), weight=weight, transpose=True)
            d_probs = -torch.bmm(d_e, f_wide.transpose(1, 2))  # (BG, m, m)
            d_logits_mm = _softmax_backward_(d_probs, probs)  # (BG, m, m)
            dq_land = torch.bmm(k_land.to(wide), d_logits_mm.transpose(1, 2))  # (BG, d, m)
            dk_land += torch.bmm(q_land.to(wide), d_logits_mm)  # (BG, d, m)

            d_e = d_e.to(ct)  # (BG, m, e)
            dv = torch.empty((bg, e, n), dtype=v.dtype, device=v.device)  # (BG, e, n)
            dk = torch.empty((bg, d, n), dtype=k.dtype, device=k.device)  # (BG, d, n)
            for s in chunks:
                ql, kk = q_land[s].to(ct), k2[s].to(ct)  # (c, d, m), (c, d, n)
                landmark_map = _landmark_map(ql, kk)  # B: (c, m, n), recomputed
                _bmm_into(dv[s], d_e[s].transpose(1, 2), landmark_map)  # dV^T = dE^T B
                d_map = torch.bmm(d_e[s], v2[s].to(ct))  # dB = dE V^T: (c, m, n)
                d_logits = _softmax_backward_(d_map, landmark_map)  # (c, m, n)
                _bmm_into(dk[s], ql, d_logits)  # dK = Q' dL: (c, d, n)
                _bmm_into(dq_land[s], kk, d_logits.transpose(1, 2), add=True)  # dQ' += K dL^T
                del landmark_map, d_map, d_logits

            # Average pooling: each landmark's gradient spreads evenly over its ph x pw patch.
            area = ph * pw
            _spread_add_(dq, (dq_land / area).to(dq.dtype), grid, (h, w))
            _spread_add_(dk, (dk_land / area).to(dk.dtype), grid, (h, w))
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), None, None


def csalr_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int],
    *,
    landmark_weight: float = LANDMARK_WEIGHT,
) -> Tensor:
    """CSALR per group: ``Y = A_nm A_mm^{-1} B V`` (eq. 14-17), re-associated.

    With landmarks ``Q', K'`` (average pooling over ``grid``, m = H'W'):
    ``E = B V`` with ``B = softmax_n(Q' K^T)``, ``F = A_mm^{-1} E`` with
    ``A_mm = softmax_m(Q' K'^T) + I``, and ``Y = A_nm F = softmax_m(Q K'^T) F + P F`` where
    ``P F`` copies each landmark's row of F to every position of its pooling patch. Neither
    ``W = A_nm A_mm^{-1}`` nor any n x n matrix is formed, and the two m x n blocks are
    formed a slice at a time and recomputed in backward rather than saved
    (:class:`_CSALRCore`): autograd keeps only q, k, v and m x m / m x e tensors.

    Measured on the 2-core CPU (B=8, 96x32, G=2, d=32, e=128, 12x8 grid, forward+backward;
    ``bench/attention.py``, bench/RESULTS.md): about 82 MiB peak (0.07x materialised SA)
    where the plain-autograd form held 127 MiB (0.105x).

    Args:
        q: queries ``(B, G, d, H, W)``.
        k: keys ``(B, G, d, H, W)``.
        v: values ``(B, G, e, H, W)``.
        grid: landmark grid ``(H', W')``; it must divide ``(H, W)``.
        landmark_weight: the weight ``c`` of the indicator terms, ``A_nm = softmax + c P``
            and ``A_mm = softmax + c I``; the paper's is 1 (:data:`LANDMARK_WEIGHT`).

    Returns:
        ``(B, G, e, H, W)``.

    Raises:
        ConfigError: the grid does not divide the feature map, or ``landmark_weight < 1``.
    """
    _check_qkv(q, k, v)
    gh, gw = grid
    _patch_size((gh, gw), *q.shape[-2:])  # refuse a bad grid before any work
    _check_landmark_weight(landmark_weight)
    return _CSALRCore.apply(q, k, v, (gh, gw), float(landmark_weight))


# ---- CSALR with the value and fuse projections applied to landmark rows ---------------------


class _LandmarkPool(torch.autograd.Function):
    """``Z = [X B_1^T, ..., X B_G^T]``: the input map pooled by each group's landmark map.

    ``B_g = softmax_n(Q'_g K_g^T)``; for each image one product of ``X`` (C x n) with the G
    stacked blocks (n x Gm). Saves only its inputs; backward recomputes the blocks a slice of
    images at a time, as :class:`_CSALRCore` does.

    Inputs: landmark queries ``(B, G, d, m)``, keys ``(B, G, d, n)``, input ``(B, C, n)``.
    Output: ``(B, C, G*m)``.
    """

    @staticmethod
    def forward(ctx, q_land: Tensor, k: Tensor, x: Tensor) -> Tensor:
        b, g, d, m = q_land.shape
        c, n = x.shape[1:]
        ct = _compute_dtype(q_land, k, x)
        z = torch.empty((b, c, g * m), dtype=ct, device=x.device)  # (B, C, G*m)
        with torch.autocast(device_type=x.device.type, enabled=False):
            for s in _chunks(b, g * m * n):
                ql = q_land[s].flatten(0, 1).to(ct)  # (c*G, d, m)
                kk = k[s].flatten(0, 1).to(ct)  # (c*G, d, n)
                blocks = _landmark_map(ql, kk).view(-1, g * m, n)  # (c, G*m, n)
                torch.bmm(x[s].to(ct), blocks.transpose(1, 2), out=z[s])  # (c, C, G*m)
        ctx.save_for_backward(q_land, k, x)
        ctx.ct = ct
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q_land, k, x = ctx.saved_tensors
        ct = ctx.ct
        b, g, d, m = q_land.shape
        c, n = x.shape[1:]
        dq_land = torch.empty(q_land.shape, dtype=q_land.dtype, device=x.device)  # (B, G, d, m)
        dk = torch.empty(k.shape, dtype=k.dtype, device=x.device)  # (B, G, d, n)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (B, C, n)
        with torch.autocast(device_type=x.device.type, enabled=False):
            for s in _chunks(b, g * m * n):
                ql = q_land[s].flatten(0, 1).to(ct)  # (c*G, d, m)
                kk = k[s].flatten(0, 1).to(ct)  # (c*G, d, n)
                blocks = _landmark_map(ql, kk).view(-1, g * m, n)  # (c, G*m, n), recomputed
                dzs = dz[s].to(ct)  # (c, C, G*m)
                _bmm_into(dx[s], dzs, blocks)  # dX = dZ B: (c, C, n)
                d_blocks = torch.bmm(dzs.transpose(1, 2), x[s].to(ct))  # dB = dZ^T X
                d_logits = _softmax_backward_(d_blocks, blocks).view(-1, m, n)  # (c*G, m, n)
                _bmm_into(dk[s].flatten(0, 1), ql, d_logits)  # dK = Q' dL: (c*G, d, n)
                _bmm_into(dq_land[s].flatten(0, 1), kk, d_logits.transpose(1, 2))  # dQ' = K dL^T
                del blocks, d_blocks, d_logits
        return dq_land, dk, dx


class _LandmarkSpread(torch.autograd.Function):
    """``Y = sum_g R_g A_nm,g^T + b``: group g's landmark rows spread back over the map.

    ``R_g`` (C x m) are group g's landmark rows, ``A_nm,g = softmax_m(Q_g K'_g^T) + c P`` its
    coefficients (P folded in, :func:`_add_indicator_`) and ``b`` (C,) a bias or None.
    Saves only its inputs; backward recomputes the n x m coefficients a slice of images and
    one group at a time.

    Inputs: queries ``(B, G, d, n)``, landmark keys ``(B, G, d, m)``, rows ``(B, G, C, m)``,
    bias, the grid, the map size and ``c``. Output: ``(B, C, n)``.
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k_land: Tensor,
        rows: Tensor,
        bias: Tensor | None,
        grid: tuple[int, int],
        size: tuple[int, int],
        weight: float,
    ) -> Tensor:
        b, g, d, n = q.shape
        c, m = rows.shape[2:]
        ct = _compute_dtype(q, k_land, rows)
        y = torch.empty((b, c, n), dtype=ct, device=q.device)  # (B, C, n)
        with torch.autocast(device_type=q.device.type, enabled=False):
            for s in _chunks(b, m * n):
                for group in range(g):
                    coeff = _coefficients(q[s, group].to(ct), k_land[s, group].to(ct))
                    a_nm = _add_indicator_(coeff, grid, size, weight).transpose(1, 2)  # (c, m, n)
                    r = rows[s, group].to(ct)  # (c, C, m)
                    if group > 0:
                        y[s].baddbmm_(r, a_nm)  # (c, C, n)
                    elif bias is None:
                        torch.bmm(r, a_nm, out=y[s])
                    else:
                        torch.baddbmm(bias.to(ct).view(1, c, 1), r, a_nm, out=y[s])
        ctx.save_for_backward(q, k_land, rows)
        ctx.grid, ctx.size, ctx.ct, ctx.weight = grid, size, ct, weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None, None, None, None]:
        q, k_land, rows = ctx.saved_tensors
        ct, grid, size, weight = ctx.ct, ctx.grid, ctx.size, ctx.weight
        b, g, d, n = q.shape
        c, m = rows.shape[2:]
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, G, d, n)
        dk_land = torch.empty(k_land.shape, dtype=k_land.dtype, device=q.device)  # (B, G, d, m)
        d_rows = torch.empty(rows.shape, dtype=rows.dtype, device=q.device)  # (B, G, C, m)
        with torch.autocast(device_type=q.device.type, enabled=False):
            for s in _chunks(b, m * n):
                dys = dy[s].to(ct)  # (c, C, n)
                for group in range(g):
                    qg, kg = q[s, group].to(ct), k_land[s, group].to(ct)  # (c, d, n), (c, d, m)
                    coeff = _coefficients(qg, kg)  # C: (c, n, m), recomputed
                    d_coeff = torch.bmm(dys.transpose(1, 2), rows[s, group].to(ct))  # (c, n, m)
                    d_logits = _softmax_backward_(d_coeff, coeff)  # (c, n, m)
                    _bmm_into(dq[s, group], kg, d_logits.transpose(1, 2))  # dQ = K' dL^T
                    _bmm_into(dk_land[s, group], qg, d_logits)  # dK' = Q dL: (c, d, m)
                    del d_coeff, d_logits
                    a_nm = _add_indicator_(coeff, grid, size, weight)  # A_nm, over C (used above)
                    _bmm_into(d_rows[s, group], dys, a_nm)  # dR = dY A_nm: (c, C, m)
                    del coeff, a_nm
            d_bias = None if ctx.bias_dtype is None else dy.sum(dim=(0, 2)).to(ctx.bias_dtype)
        return dq, dk_land, d_rows, d_bias, None, None, None


def csalr_projected(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    value: tuple[Tensor, Tensor | None],
    fuse: tuple[Tensor, Tensor | None],
    grid: tuple[int, int],
    *,
    landmark_weight: float = LANDMARK_WEIGHT,
) -> Tensor:
    """``fuse(csalr_attention(q, k, value(x)))`` with value and fuse applied to landmark rows.

    Both 1x1 convs are linear maps over channels and CSALR mixes positions only, so they
    commute with it. With ``B_g`` a softmax over positions (rows sum to 1, so the value bias
    passes through), group g's ``E_g^T = W_v,g (X B_g^T) + b_v,g``; then ``F_g`` as in
    :func:`csalr_attention`; and the fused output is ``sum_g (W_f,g F_g^T) A_nm,g^T + b_f``.
    The value and fuse products act on G x m landmark rows instead of n positions: per
    image ``2 C^2 m + 2 G C m n`` multiply-adds against ``2 C^2 n + 2 C m n`` for the convs
    on the map (:func:`csalr_projection_costs`), and neither V nor the core's output Y
    (C x n each) exists, so autograd keeps only q and k at map size. Exact: the same
    function, rounded differently.

    Args:
        x: the module input ``(B, C, H, W)``.
        q: queries ``(B, G, d, H, W)``.
        k: keys ``(B, G, d, H, W)``.
        value: the value conv's ``(weight (C, C, 1, 1), bias (C,) or None)``.
        fuse: the fuse conv's ``(weight (C, C, 1, 1), bias (C,) or None)``.
        grid: landmark grid ``(H', W')``; it must divide ``(H, W)``.
        landmark_weight: the indicator weight ``c``, as in :func:`csalr_attention`.

    Returns:
        ``(B, C, H, W)``: what ``fuse`` would return on the grouped core's output.
    """
    _check_qkv(q, k, q)
    b, g, d, h, w = q.shape
    c = x.shape[1]
    if x.shape != (b, c, h, w) or c % g:
        raise ValueError(f"x shape {tuple(x.shape)} does not fit q shape {tuple(q.shape)}")
    e = c // g
    gh, gw = grid
    _patch_size((gh, gw), h, w)  # refuse a bad grid before any work
    _check_landmark_weight(landmark_weight)
    c_ind = float(landmark_weight)
    m, n = gh * gw, h * w
    (wv, bv), (wf, bf) = value, fuse
    q_land = _pool(q.reshape(b * g, d, h, w), (gh, gw)).view(b, g, d, m)  # (B, G, d, m)
    k_land = _pool(k.reshape(b * g, d, h, w), (gh, gw)).view(b, g, d, m)  # (B, G, d, m)
    k_flat = k.reshape(b, g, d, n)  # (B, G, d, n)
    pooled = _LandmarkPool.apply(q_land, k_flat, x.reshape(b, c, n)).view(b, c, g, m)  # X B_g^T
    e_t = torch.einsum("gec,bcgm->bgem", wv.reshape(g, e, c), pooled)  # (B, G, e, m)
    if bv is not None:
        e_t = e_t + bv.view(1, g, e, 1)  # rows of B_g sum to 1: the bias passes through
    probs = _landmark_probs(q_land.flatten(0, 1), k_land.flatten(0, 1))  # (BG, m, m)
    f = _landmark_solve(probs, e_t.flatten(0, 1).transpose(1, 2), weight=c_ind)  # (BG, m, e)
    f = f.to(e_t.dtype)
    rows = torch.einsum("cge,bgme->bgcm", wf.reshape(c, g, e), f.view(b, g, m, e))  # (B, G, C, m)
    y = _LandmarkSpread.apply(q.reshape(b, g, d, n), k_land, rows, bf, (gh, gw), (h, w), c_ind)
    return y.view(b, c, h, w)  # (B, C, H, W)


def csalr_projection_costs(
    channels: int, groups: int, landmarks: int, positions: int
) -> dict[str, int]:
    """Multiply-adds per image of the parts where CSALR's two projection orders differ.

    ``"pixels"``: value and fuse convs on the map (``2 C^2 n``) and the core's products with
    V and F (``2 C m n``); ``"landmarks"``: :func:`csalr_projected` (``2 C^2 m`` for the
    projections on landmark rows, ``2 G C m n`` for pooling X and spreading the rows back).
    """
    c, g, m, n = channels, groups, landmarks, positions
    return {"pixels": 2 * c * c * n + 2 * c * m * n, "landmarks": 2 * c * c * m + 2 * g * c * m * n}


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


def _csalr_blocks(
    q: Tensor, k: Tensor, grid: tuple[int, int], weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The literal blocks ``A_nm`` (eq. 15), ``A_mm`` (eq. 16) and ``B = A_mn`` (eq. 13), with
    the indicator terms weighted by ``weight`` (1 in the paper)."""
    h, w = q.shape[-2:]
    q_, k_ = q.flatten(3), k.flatten(3)  # (B, G, d, n)
    q_land, k_land = _pool_reference(q, grid), _pool_reference(k, grid)  # (B, G, d, m)
    m = q_land.shape[-1]
    indicator = _patch_indicator(h, w, grid, q)  # (n, m)
    eye = torch.eye(m, dtype=q.dtype, device=q.device)  # (m, m): 1(Q'_i, K'_j)
    a_nm = _softmax_reference(torch.einsum("bgdi,bgdk->bgik", q_, k_land), -1)  # (B, G, n, m)
    a_mm = _softmax_reference(torch.einsum("bgdl,bgdk->bglk", q_land, k_land), -1)  # (B, G, m, m)
    landmark_map = _softmax_reference(torch.einsum("bgdk,bgdj->bgkj", q_land, k_), -1)  # (.., m, n)
    return a_nm + weight * indicator, a_mm + weight * eye, landmark_map


def csalr_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int],
    *,
    landmark_weight: float = LANDMARK_WEIGHT,
) -> Tensor:
    """Naive CSALR straight from eq. 13-17: literal ``A_nm``, ``A_mm``, ``B``, ``W`` (float64-able).

    ``W = A_nm A_mm^{-1}`` is formed with an explicit inverse, then ``Y_i = sum_k W_ik E_k``
    with ``E = B V`` (eq. 17).
    """
    _check_qkv(q, k, v)
    a_nm, a_mm, landmark_map = _csalr_blocks(q, k, grid, landmark_weight)
    coeff = a_nm @ torch.linalg.inv(a_mm)  # W: (B, G, n, m)
    e_land = torch.einsum("bgkj,bgej->bgke", landmark_map, v.flatten(3))  # E: (B, G, m, e)
    y = torch.einsum("bgik,bgke->bgei", coeff, e_land)  # (B, G, e, n)
    return y.unflatten(-1, q.shape[-2:])  # (B, G, e, H, W)


def csalr_attention_map(
    q: Tensor, k: Tensor, grid: tuple[int, int], *, landmark_weight: float = LANDMARK_WEIGHT
) -> Tensor:
    """The reconstructed n x n attention map ``W B = A_nm A_mm^{-1} B`` (eq. 14) per group.

    For tests, the paper's approximation claim and attention figures: it materialises n x n,
    so keep inputs small. Every row sums to 1, as ``A_nm 1 = A_mm 1 = (1 + c) 1`` and
    ``B 1 = 1``, whatever the indicator weight ``c``.

    Returns:
        ``(B, G, n, n)``.
    """
    _check_qkv(q, k, k)
    a_nm, a_mm, landmark_map = _csalr_blocks(q, k, grid, landmark_weight)
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


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` over every element, without the product tensor where BLAS can do it."""
    if a.dtype == b.dtype and a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


class _GatedResidual(torch.autograd.Function):
    """``x + alpha * fused`` (eq. 2 and 17) in one pass.

    Autograd through ``x + alpha * fused`` writes the product and the sum in forward, and
    in backward writes ``grad * alpha`` and ``grad * fused`` (for alpha's gradient, summed).
    Here forward is one ``addcmul``, and alpha's gradient a dot product that writes nothing.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fused: Tensor, alpha: Tensor) -> Tensor:
        ctx.save_for_backward(fused, alpha)
        return torch.addcmul(x, fused, alpha)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fused, alpha = ctx.saved_tensors
        d_fused = (grad * alpha).to(fused.dtype)
        d_alpha = _inner(grad, fused.to(grad.dtype)).to(alpha.dtype).view_as(alpha)
        return grad, d_fused, d_alpha


class _GatedResidualAndPool(torch.autograd.Function):
    """``out = x + alpha * fused`` and ``pooled = mean_hw(x * fused)`` (eq. 17 and 18) at once.

    Both read x and fused; in backward ``dx = g_out + g_pooled / n * fused`` and
    ``dfused = alpha * g_out + g_pooled / n * x`` take three passes where autograd through
    the two expressions writes six map-sized tensors and adds them up.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fused: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, fused, alpha)
        out = torch.addcmul(x, fused, alpha)  # (B, C, H, W)
        dtype = torch.promote_types(x.dtype, fused.dtype)
        pooled = torch.linalg.vecdot(x.flatten(2).to(dtype), fused.flatten(2).to(dtype))  # (B, C)
        return out, pooled / (x.shape[2] * x.shape[3])

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out: Tensor, g_pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, fused, alpha = ctx.saved_tensors
        scale = (g_pooled / (x.shape[2] * x.shape[3]))[:, :, None, None]  # (B, C, 1, 1)
        dx = torch.addcmul(g_out, fused, scale).to(x.dtype)  # g_out + scale * fused
        d_fused = torch.mul(g_out, alpha).addcmul_(x, scale).to(fused.dtype)
        d_alpha = _inner(g_out, fused.to(g_out.dtype)).to(alpha.dtype).view_as(alpha)
        return dx, d_fused, d_alpha


def gated_residual(x: Tensor, fused: Tensor, alpha: Tensor) -> Tensor:
    """The gated residual ``x + alpha * fused`` (eq. 2 and 17), with a lean backward."""
    return _GatedResidual.apply(x, fused, alpha)


def gated_residual_and_pool(x: Tensor, fused: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """``(x + alpha * fused, mean over H, W of x * fused)``: the gated residual (eq. 17) and
    deep supervision's pooled feature (eq. 18) in one function, ``(B, C, H, W)`` and
    ``(B, C)``."""
    return _GatedResidualAndPool.apply(x, fused, alpha)


def pointwise(x: Tensor, convs: Sequence[nn.Conv2d]) -> Tensor:
    """The 1x1 convs ``convs`` applied to ``x`` ``(B, C, H, W)``, stacked: one batched product.

    The same result as ``torch.cat([conv(x) for conv in convs], 1)``. Measured on the 2-core
    CPU (torch 2.13, batch 8, forward+backward), oneDNN's 1x1 convolutions took 65 ms for Q
    and K at the 256x96x32 map where one ``baddbmm`` with the stacked weights takes 23 ms
    (backward dominated); at 512x48x16 and 1024x24x8 they are on par.

    Returns:
        ``(B, sum of out_channels, H, W)``.
    """
    weight = torch.cat([conv.weight.flatten(1) for conv in convs])  # (C_out, C)
    biases = [conv.bias for conv in convs]
    b, _, h, w = x.shape
    if all(bias is not None for bias in biases):
        bias = torch.cat(biases).view(1, -1, 1)  # (1, C_out, 1)
        out = torch.baddbmm(bias, weight.expand(b, -1, -1), x.flatten(2))  # (B, C_out, n)
    else:
        if any(bias is not None for bias in biases):
            raise ValueError("pointwise: either every conv has a bias or none has")
        out = torch.bmm(weight.expand(b, -1, -1), x.flatten(2))  # (B, C_out, n)
    return out.view(b, -1, h, w)  # (B, C_out, H, W)


class GroupedAttention(nn.Module):
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

    def _projections(
        self, x: Tensor, *, value: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Grouped q, k (None without a key conv) and, if asked, v, from one product."""
        convs = [c for c in (self.query, self.key) if c is not None]
        convs += [self.value] if value else []
        out = pointwise(x, convs)  # (B, C' [+ C'] [+ C], H, W)
        parts = list(out.split([c.out_channels for c in convs], dim=1))
        q = self._grouped(parts.pop(0))  # (B, G, d, H, W)
        k = self._grouped(parts.pop(0)) if self.key is not None else None  # (B, G, d, H, W)
        v = self._grouped(parts.pop(0)) if value else None  # (B, G, C/G, H, W)
        return q, k, v

    def _queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        q, k, _ = self._projections(x, value=False)
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
        fused = self.fused_output(x)  # (B, C, H, W)
        return gated_residual(x, fused, self.alpha), fused

    def fused_output(self, x: Tensor) -> Tensor:
        """``fuse(Y)`` alone, for ``x`` ``(B, C, H, W)``: what :meth:`forward` gates.

        Value conv, grouped core, fuse conv. For callers that apply the gate themselves
        (:func:`gated_residual_and_pool`).
        """
        q, k, v = self._projections(x, value=True)
        assert v is not None
        y = self._attend(q, k, v)  # (B, G, C/G, H, W)
        return pointwise(y.flatten(1, 2), [self.fuse])  # (B, C, H, W)

    def attention_map(self, x: Tensor) -> Tensor:
        """The n x n attention map each group applies to ``x`` ``(B, C, H, W)``: ``(B, G, n, n)``.

        For visualisation; it materialises n x n per group, so use small inputs. Row i is the
        weight each position j gets in position i's output.
        """
        q, k = self._queries_keys(x)
        return self._map(q, k)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, qk_channels={self.qk_channels}"


class SelfAttention(GroupedAttention):
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


class CSA(GroupedAttention):
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


class CSALR(GroupedAttention):
    """Compressed self-attention with low-rank approximation (the paper's module, eq. 13-17).

    Args:
        channels: input and output channels C.
        groups: number of groups (heads); 2 was best in the paper's Table 3.
        grid: landmark grid ``(H', W')``, m = H'W' landmarks per group; 12x8 = 96 landmarks,
            as in the paper, divides the 96x32, 48x16 and 24x8 maps of a 384x128 input.
        qk_ratio: Q and K get ``round(qk_ratio * C)`` channels.
        projection: where the value and fuse 1x1 convs run: ``"pixels"`` on the map, as
            written; ``"landmarks"`` on the G x m landmark rows (:func:`csalr_projected`, the
            same function with fewer multiply-adds when G m is small against C, and without
            the map-sized V and Y); ``"auto"`` picks the one with fewer multiply-adds for
            each input's shape (:func:`csalr_projection_costs`). The parameters are the same
            either way.
        landmark_weight: weight ``c`` of the indicator terms in ``A_nm`` and ``A_mm``; 1 is
            the paper's, 2 keeps ``A_mm`` well conditioned when attention turns sharp
            (:data:`LANDMARK_WEIGHT`).
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int = 2,
        grid: tuple[int, int] = (12, 8),
        qk_ratio: float = 0.25,
        projection: Literal["auto", "pixels", "landmarks"] = "auto",
        landmark_weight: float = LANDMARK_WEIGHT,
    ) -> None:
        super().__init__(channels, groups=groups, qk_ratio=qk_ratio)
        _check_landmark_weight(landmark_weight)
        self.landmark_weight = float(landmark_weight)
        grid = tuple(grid)
        if len(grid) != 2 or not all(isinstance(s, int) and s >= 1 for s in grid):
            raise ConfigError(f"CSALR: grid must be two positive sides (H', W'), got {grid}")
        if projection not in ("auto", "pixels", "landmarks"):
            raise ConfigError(
                f"CSALR: projection must be auto, pixels or landmarks, got {projection!r}"
            )
        self.grid: tuple[int, int] = grid
        self.projection = projection

    def projects_on_landmarks(self, height: int, width: int) -> bool:
        """Whether an input of this map size runs value and fuse on the landmark rows."""
        if self.projection != "auto":
            return self.projection == "landmarks"
        m, n = self.grid[0] * self.grid[1], height * width
        costs = csalr_projection_costs(self.channels, self.groups, m, n)
        return costs["landmarks"] < costs["pixels"]

    def fused_output(self, x: Tensor) -> Tensor:
        if not self.projects_on_landmarks(*x.shape[-2:]):
            return super().fused_output(x)
        q, k = self._queries_keys(x)
        value = (self.value.weight, self.value.bias)
        fuse = (self.fuse.weight, self.fuse.bias)
        return csalr_projected(
            x, q, k, value, fuse, self.grid, landmark_weight=self.landmark_weight
        )

    def _attend(self, q: Tensor, k: Tensor | None, v: Tensor) -> Tensor:
        assert k is not None
        return csalr_attention(q, k, v, self.grid, landmark_weight=self.landmark_weight)

    def _map(self, q: Tensor, k: Tensor | None) -> Tensor:
        assert k is not None
        return csalr_attention_map(q, k, self.grid, landmark_weight=self.landmark_weight)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, grid={self.grid}, projection={self.projection}, "
            f"landmark_weight={self.landmark_weight:g}"
        )


ATTENTION: dict[str, type[GroupedAttention]] = {
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
    landmark_weight: float | None = None,
) -> nn.Module:
    """Build the attention module named ``kind`` from :data:`ATTENTION`.

    Each class gets only the options it takes (SA ignores ``grid``, ``bases`` and
    ``landmark_weight``, CSA ignores ``grid`` and ``landmark_weight``, CSALR ignores
    ``bases``); an option left as None keeps the class default. Kind ``"none"`` (no
    attention) is the caller's to handle.

    Raises:
        ConfigError: unknown kind, or options the module refuses.
    """
    if kind not in ATTENTION:
        raise ConfigError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION)}")
    cls = ATTENTION[kind]
    options = {
        "groups": groups,
        "grid": grid,
        "qk_ratio": qk_ratio,
        "bases": bases,
        "landmark_weight": landmark_weight,
    }
    accepted = inspect.signature(cls).parameters
    return cls(channels, **{k: v for k, v in options.items() if v is not None and k in accepted})
