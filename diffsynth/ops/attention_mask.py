"""Regional attention masks kept in factored form and materialised one block of query rows at a time.

EliGen's mask over [text, image] tokens is (L x L) but has little structure: image <-> image is always
allowed, text <-> text only within a text group, text group g <-> image tokens inside its region. Built in
full it costs L^2 bytes per call, and SDPA turns a boolean mask into a float copy (4 L^2 bytes in fp32) at
every block; at 1024^2 with 4 entity prompts (L = 6656) that is 44 + 177 MB. `GroupMask` keeps only the
group ids and regions (O(L)); `chunked_attention` runs attention on query blocks whose mask rows are built
on the fly. Softmax is per query row, so every block's result is exactly the dense masked attention's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

# Mask elements (batch x query rows x keys) materialised per query block: 4M = 16 MB as an fp32 bias.
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class GroupMask:
    """Attention mask over [text (T tokens), image (P tokens)] (True = may attend), in factored form.

    group (T,) long: each text token's group; text <-> text is allowed within a group only.
    inside (B, G, P) bool: the image tokens that group g's text attends to and is attended by.
    Image <-> image is always allowed.
    """
    group: torch.Tensor
    inside: torch.Tensor

    def __post_init__(self):
        if self.group.dim() != 1 or self.inside.dim() != 3:
            raise ValueError(f"GroupMask expects group (T,) and inside (B, G, P), got {tuple(self.group.shape)} "
                             f"and {tuple(self.inside.shape)}")

    @property
    def tokens(self) -> int:
        return self.group.numel() + self.inside.shape[-1]

    def batch_rows(self, rows: torch.Tensor) -> "GroupMask":
        """The mask of batch rows `rows` (a mask shared by the batch stays as it is)."""
        return self if self.inside.shape[0] == 1 else replace(self, inside=self.inside[rows])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Dense boolean rows start..stop-1 of the (L x L) mask: (B, 1, stop - start, L)."""
        t = self.group.numel()
        b, _, p = self.inside.shape
        parts = []
        if start < t:  # text queries
            grp = self.group[start:min(stop, t)]
            text_text = (grp[:, None] == self.group[None, :]).expand(b, -1, -1)                 # (B, c, T)
            parts.append(torch.cat([text_text, self.inside[:, grp]], 2))                       # (B, c, L)
        if stop > t:  # image queries
            lo, hi = max(start, t) - t, stop - t
            image_text = self.inside[:, self.group, lo:hi].transpose(1, 2)                     # (B, c, T)
            parts.append(torch.cat([image_text, image_text.new_ones(b, hi - lo, p)], 2))       # (B, c, L)
        return torch.cat(parts, 1)[:, None]

    def dense(self) -> torch.Tensor:
        """The whole (B, 1, L, L) boolean mask (reference and tests; the attention never builds it)."""
        return self.rows(0, self.tokens)


def chunked_attention(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: GroupMask,
                      block_elements: int | None = None) -> torch.Tensor:
    """`attend(q_block, k, v, dense_mask_rows)` over blocks of query rows; q (B, H, n, D) are the last n of
    the mask's L tokens (a single block's last layer computes image queries only), k, v (B, H, L, D).
    A block's mask rows hold at most `block_elements` (default BLOCK_ELEMENTS) elements, at least one row."""
    b, heads, n, _ = q.shape
    length = k.shape[2]
    if length != mask.tokens:
        raise ValueError(f"attention mask covers {mask.tokens} tokens but there are {length} keys")
    offset = length - n
    step = max(1, (block_elements or BLOCK_ELEMENTS) // (max(b, mask.inside.shape[0]) * length))
    if step >= n:
        return attend(q, k, v, mask.rows(offset, length))
    out = q.new_empty(b, n, heads, v.shape[-1]).transpose(1, 2)  # SDPA's own layout: merging heads is a view
    for i in range(0, n, step):
        j = min(i + step, n)
        out[:, :, i:j] = attend(q[:, :, i:j], k, v, mask.rows(offset + i, offset + j))
    return out


def select_batch(mask, rows: torch.Tensor):
    """A dense (B|1, ...) mask tensor or a GroupMask restricted to batch rows `rows`."""
    if isinstance(mask, GroupMask):
        return mask.batch_rows(rows)
    return mask[rows] if mask is not None and mask.shape[0] > 1 else mask


def query_tail(mask, n: int):
    """The mask for the last `n` queries: a dense (..., L, L) tensor is sliced; a GroupMask infers them."""
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.shape[-2] > 1:
        return mask[..., -n:, :]
    return mask
