"""MoRA's sizes and RoPE tables (docs/contract.md §3), one copy for the torch, cpu and triton backends.

``MoraGeometry`` holds the sizes of one layer (k in_features, d out_features, R = r_hat, the wrap
padding and the chunks of the padded input); ``rope_tables`` is the one cached builder of type 6's
fp32 cos / sin tables and ``rotate_half`` the one rotate-half.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

MORA_TYPES = (1, 2, 3, 4, 6)


def mora_r_hat(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """Side of the square matrix M: round(sqrt((k + d) * r)), floored to even for type 6."""
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    return r_hat // 2 * 2 if mora_type == 6 else r_hat


def mora_padding(in_features: int, r_hat: int, mora_type: int) -> int:
    """Number of wrap-padded features (types 1, 4, 6); 0 for types 2 and 3."""
    if mora_type in (2, 3) or in_features % r_hat == 0:
        return 0
    return r_hat - in_features % r_hat


@functools.lru_cache(maxsize=64)
def rope_tables(r_hat: int, n_chunks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n_chunks, r_hat] in fp32, contiguous: angle(i, j) = i * 10000^(-2 (j mod r_hat/2) / r_hat).

    Cached per (r_hat, n_chunks, device); never part of a state_dict."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2, dtype=torch.float32, device=device) / r_hat))
    positions = torch.arange(n_chunks, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().contiguous(), angles.sin().contiguous()


def rotate_half(z: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dimension (HF-LLaMA rotate-half layout)."""
    half = z.shape[-1] // 2
    return torch.cat([-z[..., half:], z[..., :half]], dim=-1)


@dataclass(frozen=True)
class MoraGeometry:
    """Sizes of one MoRA layer: k in_features, d out_features, R = r_hat, wrap padding, chunks.

    ``K``, ``D``, ``R`` are the short names the kernel launchers pass to the kernels."""

    in_features: int
    out_features: int
    r_hat: int
    mora_type: int

    @property
    def K(self) -> int:
        return self.in_features

    @property
    def D(self) -> int:
        return self.out_features

    @property
    def R(self) -> int:
        return self.r_hat

    @property
    def pad(self) -> int:
        return mora_padding(self.in_features, self.r_hat, self.mora_type)

    @property
    def n_chunks(self) -> int:
        return (self.in_features + self.pad) // self.r_hat

    @property
    def full_chunks(self) -> int:
        """Chunks that lie entirely inside x (the last one is split by the wrap when pad > 0)."""
        return self.in_features // self.r_hat

    @property
    def span(self) -> int:
        """n R: the length of the concatenated chunks."""
        return self.n_chunks * self.r_hat

    @property
    def used(self) -> int:
        """Chunks that reach at least one output (type 6; all of them when n R <= D)."""
        return min(self.n_chunks, math.ceil(self.out_features / self.r_hat))

    @property
    def n_tiles(self) -> int:
        """Output tiles of period n R (type 6: > 1 when n R < D); 1 when span is 0 (types 2, 3 with
        R > K have no chunks, and only type 6 reads this)."""
        return math.ceil(self.out_features / self.span) if self.span else 1

    @property
    def in_contig(self) -> bool:
        """Types 2, 3 compress contiguous groups of the input (else a strided sum over chunks)."""
        return self.mora_type in (2, 3)

    @property
    def out_contig(self) -> bool:
        """Types 2, 4 decompress by repeat_interleave (else by tiling)."""
        return self.mora_type in (2, 4)
