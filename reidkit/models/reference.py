"""Literal attention maps and outputs straight from the equations: the oracles and the figures.

Chen, Gong, Ge, Du, IJCAI 2020, eq. 1 and 10-17 (SA and CSALR), and Chen et al., AAAI 2020
(CSA). Everything here materialises n x n or n x m matrices, writes softmax out as exp / sum
and inverts ``A_mm`` explicitly, exactly as the paper writes it: slow and memory-hungry, and
independent of the re-associated forms in :mod:`reidkit.models.attention`, which the tests
hold to these in float64. The ``*_map`` functions also draw the paper's Figure 4.

Tensors follow the cores' layout: ``q``, ``k`` are ``(B, G, d, H, W)``, ``v`` is
``(B, G, e, H, W)``; CSA's ``q`` is ``(B, C', H, W)``, all of Q, which every group's bases see.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reidkit.errors import ConfigError

# CSA's scale on cosine similarities (the authors' CSA code): cosines lie in [-1, 1] and 14
# spreads them enough for the softmaxes to be selective.
CSA_SCALE = 14.0


def softmax_reference(logits: Tensor, dim: int) -> Tensor:
    """Softmax written out as exp / sum, independent of torch.softmax."""
    z = torch.exp(logits - logits.amax(dim=dim, keepdim=True))
    return z / z.sum(dim=dim, keepdim=True)


def patch_size(grid: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """The pooling patch (kernel = stride) that turns an H x W map into the H' x W' grid."""
    gh, gw = grid
    if gh < 1 or gw < 1 or height % gh or width % gw:
        raise ConfigError(
            f"landmark grid {gh}x{gw} does not divide the {height}x{width} feature map; "
            f"choose grid sides that divide {height} and {width} (the paper's 12x8 divides "
            "the 96x32, 48x16 and 24x8 maps of a 384x128 input)"
        )
    return height // gh, width // gw


def pool_reference(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Average pooling over the grid's patches, as a reshape and a mean: ``(B, G, c, m)``."""
    b, g, c, h, w = x.shape
    gh, gw = grid
    ph, pw = patch_size(grid, h, w)
    patches = x.reshape(b, g, c, gh, ph, gw, pw)  # (B, G, c, H', ph, W', pw)
    return patches.mean(dim=(4, 6)).flatten(3)  # (B, G, c, m), landmarks row-major


def patch_indicator(h: int, w: int, grid: tuple[int, int], like: Tensor) -> Tensor:
    """The n x m indicator P of eq. 15: ``P[i, k] = 1`` iff position i lies in pooling patch k."""
    gh, gw = grid
    ph, pw = patch_size(grid, h, w)
    rows = torch.arange(h, device=like.device).repeat_interleave(w)  # (n,) row of position i
    cols = torch.arange(w, device=like.device).repeat(h)  # (n,) column of position i
    patch = (rows // ph) * gw + cols // pw  # (n,) index k of i's patch, row-major in the grid
    landmarks = torch.arange(gh * gw, device=like.device)  # (m,)
    return (patch[:, None] == landmarks[None, :]).to(like.dtype)  # (n, m)


def full_attention_map(q: Tensor, k: Tensor) -> Tensor:
    """The full map ``A_nn = softmax_n(Q K^T)`` (eq. 1, 10) per group: ``(B, G, n, n)``."""
    logits = torch.einsum("bgdi,bgdj->bgij", q.flatten(3), k.flatten(3))  # (B, G, n, n)
    return softmax_reference(logits, dim=-1)


def full_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Eq. 1-2 without the gate: ``Y_i = sum_j A_ij V_j``, with ``A_nn`` materialised."""
    y = torch.einsum("bgij,bgej->bgei", full_attention_map(q, k), v.flatten(3))  # (B, G, e, n)
    return y.unflatten(-1, q.shape[-2:])  # (B, G, e, H, W)


def csalr_blocks(
    q: Tensor, k: Tensor, grid: tuple[int, int], landmark_weight: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The literal ``A_nm`` (eq. 15), ``A_mm`` (eq. 16) and ``B = A_mn`` (eq. 13), per group.

    The indicator terms are weighted by ``landmark_weight`` (c; the paper's is 1).
    Shapes ``(B, G, n, m)``, ``(B, G, m, m)`` and ``(B, G, m, n)``.
    """
    h, w = q.shape[-2:]
    q_, k_ = q.flatten(3), k.flatten(3)  # (B, G, d, n)
    q_land, k_land = pool_reference(q, grid), pool_reference(k, grid)  # Q', K': (B, G, d, m)
    m = q_land.shape[-1]
    indicator = patch_indicator(h, w, grid, q)  # (n, m): 1(Q_i, K'_j)
    eye = torch.eye(m, dtype=q.dtype, device=q.device)  # (m, m): 1(Q'_i, K'_j)
    a_nm = softmax_reference(torch.einsum("bgdi,bgdk->bgik", q_, k_land), -1)  # (B, G, n, m)
    a_mm = softmax_reference(torch.einsum("bgdl,bgdk->bglk", q_land, k_land), -1)  # (B, G, m, m)
    a_mn = softmax_reference(torch.einsum("bgdk,bgdj->bgkj", q_land, k_), -1)  # (B, G, m, n)
    return a_nm + landmark_weight * indicator, a_mm + landmark_weight * eye, a_mn


def csalr_attention_map(
    q: Tensor, k: Tensor, grid: tuple[int, int], *, landmark_weight: float = 1.0
) -> Tensor:
    """The reconstructed map ``W B = A_nm A_mm^{-1} B`` (eq. 14) per group: ``(B, G, n, n)``.

    Every row sums to 1, whatever c: ``A_nm 1 = A_mm 1 = (1 + c) 1`` and ``B 1 = 1``.
    """
    a_nm, a_mm, landmark_map = csalr_blocks(q, k, grid, landmark_weight)
    combination = a_nm @ torch.linalg.inv(a_mm)  # W: (B, G, n, m)
    return combination @ landmark_map  # (B, G, n, n)


def csalr_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], *, landmark_weight: float = 1.0
) -> Tensor:
    """Eq. 17 without the gate: ``Y_i = sum_k W_ik E_k``, ``W = A_nm A_mm^{-1}``, ``E = B V``."""
    a_nm, a_mm, landmark_map = csalr_blocks(q, k, grid, landmark_weight)
    combination = a_nm @ torch.linalg.inv(a_mm)  # W: (B, G, n, m)
    landmark_out = torch.einsum("bgkj,bgej->bgke", landmark_map, v.flatten(3))  # E: (B, G, m, e)
    y = torch.einsum("bgik,bgke->bgei", combination, landmark_out)  # (B, G, e, n)
    return y.unflatten(-1, q.shape[-2:])  # (B, G, e, H, W)


def csa_similarity(q: Tensor, bases: Tensor) -> Tensor:
    """``S = 14 cos(base_k, Q_i)``: ``q`` ``(B, C', H, W)``, ``bases`` ``(G, m, C')`` ->
    ``(B, G, m, n)``, the cosines written out as dot products over norms."""
    q_ = q.flatten(2)  # (B, C', n)
    dots = torch.einsum("gkc,bci->bgki", bases, q_)  # (B, G, m, n)
    norms = bases.norm(dim=-1)[None, :, :, None] * q_.norm(dim=1)[:, None, None, :]
    return CSA_SCALE * dots / norms  # (B, G, m, n)


def csa_attention_map(q: Tensor, bases: Tensor) -> Tensor:
    """CSA's effective n x n map ``Wc^T Ab`` per group: ``(B, G, n, n)``.

    Base maps ``Ab = softmax_n(S)`` pool positions into m elementary outputs, per-pixel
    weights ``Wc = softmax_m(S)`` mix them back.
    """
    similarity = csa_similarity(q, bases)  # (B, G, m, n)
    base_maps = softmax_reference(similarity, -1)  # Ab, over positions
    weights = softmax_reference(similarity, -2)  # Wc, over bases
    return torch.einsum("bgki,bgkj->bgij", weights, base_maps)  # (B, G, n, n)


def csa_attention_reference(q: Tensor, v: Tensor, bases: Tensor) -> Tensor:
    """CSA from its definition: ``E = Ab V``, then ``Y_i = sum_k Wc_ki E_k``."""
    similarity = csa_similarity(q, bases)  # (B, G, m, n)
    elementary = torch.einsum("bgkj,bgej->bgke", softmax_reference(similarity, -1), v.flatten(3))
    y = torch.einsum("bgki,bgke->bgei", softmax_reference(similarity, -2), elementary)
    return y.unflatten(-1, q.shape[-2:])  # (B, G, e, H, W)
