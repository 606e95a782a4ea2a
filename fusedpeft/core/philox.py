"""The dropout random stream (docs/contract.md §5): Triton's tl.rand, Philox4x32-10, on int64 tensors.

Every backend draws the same bits: the Triton kernels call tl.rand, the C++ extension restates it
in csrc, and the PyTorch path evaluates ``philox4x32_words`` / ``uniform_from_word`` below (also
inside torch.compile: the keys may be 0-dim int64 tensors). uint32 values are held in int64.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10  # float32(x) * this < 1 for every non-negative int32 x


def _mul32(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of const * x, for uint32 values held in int64.

    The product is < 2**64; int64 multiplication wraps modulo 2**64, so its bits are exactly the
    unsigned product's, and masking after the (arithmetic) shift recovers the high word.
    """
    product = x * const
    return (product >> 32) & MASK32, product & MASK32


def philox4x32_words(k0, k1, ctr: tuple, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on the key (k0, k1) (ints or 0-dim int64 tensors) and counter words ctr (four
    tensors or ints, uint32 values, at least one a tensor) -> the four output words as int64
    tensors of the counter's shape."""
    base = next(c for c in ctr if isinstance(c, torch.Tensor))
    c0, c1, c2, c3 = (c if isinstance(c, torch.Tensor) else torch.full_like(base, c) for c in ctr)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & MASK32
        k1 = (k1 + _PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_first_word(k0, k1, counter: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """First output word of Philox4x32 with key (k0, k1) and counter (counter, 0, 0, 0):
    philox4x32_words(k0, k1, (counter, 0, 0, 0))[0] with fewer tensor operations (what the
    torch backend's compiled mask evaluates).

    counter: int64 tensor of uint32 values; k0, k1: uint32 values (ints or 0-dim int64 tensors).
    The low words (c1, c3) are kept as the unmasked 64-bit products: they are only ever XORed
    into a word that is masked afterwards, so their upper bits never reach a result. Round 1
    multiplies zeros and round 2 a key (scalars), and the last round needs only word 0.
    """
    c0, c1, c2, c3 = counter, 0, 0, 0
    for i in range(rounds):
        product_b = c2 * _PHILOX_ROUND_B
        if i == rounds - 1:
            return ((product_b >> 32) ^ c1 ^ k0) & MASK32
        product_a = c0 * _PHILOX_ROUND_A
        c0, c1 = ((product_b >> 32) ^ c1 ^ k0) & MASK32, product_b
        c2, c3 = ((product_a >> 32) ^ c3 ^ k1) & MASK32, product_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & MASK32, (k1 + _PHILOX_KEY_B) & MASK32
    return c0


def uniform_from_word(word: torch.Tensor) -> torch.Tensor:
    """tl.rand's float32 in [0, 1) from Philox's first output word (uint32 values in int64), same shape."""
    folded = torch.where(word >= 2**31, MASK32 - word, word)  # the word read as int32, negatives x -> -x - 1
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def keep_mask(k0, k1, offsets: torch.Tensor, p) -> torch.Tensor:
    """Bool, offsets' shape: True where dropout with probability p (float or 0-dim float32 tensor)
    keeps the element whose Philox counter is ``offsets`` (int64 tensor, taken modulo 2**32); the
    key (k0, k1) is the 64-bit seed's low and high 32-bit words (ints or 0-dim int64 tensors)."""
    return uniform_from_word(philox_first_word(k0, k1, offsets & MASK32)) >= p


def new_dropout_seed() -> torch.Tensor:
    """One 64-bit seed (0-dim int64 CPU tensor, in [0, 2**63 - 1)) from torch's default CPU generator."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
