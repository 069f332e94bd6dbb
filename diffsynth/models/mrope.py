"""Qwen2.5-VL's multimodal RoPE (M-RoPE): the 3-D positions of a text + image sequence and the rotary tables they give
the language model (decoder_lm.DecoderLM.forward_embeds).

Every token has a time, a height and a width position. A text token has one value in all three, counting on from
the previous token; an image's merged tokens (t x h x w after the vision tower's spatial merge, row-major) count t, h
and w from the position where the image starts, and the text after it resumes at that start + max(h, w):

    text "a b <vision_start>"   image of 1 x 2 x 3 merged tokens   text "<vision_end> c"
    t:   0 1 2                  3 3 3 3 3 3                        6 7
    h:   0 1 2                  3 3 3 4 4 4                        6 7
    w:   0 1 2                  3 4 5 3 4 5                        6 7

The head_dim / 2 RoPE frequencies are split into three sections (`mrope_section`, e.g. 16/24/24 of 64): the first
turns with the time position, the second with the height, the third with the width. Padding (attention_mask 0) is
left out of the count and gets position 0, as transformers 5 gives it.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import torch


def mrope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: Sequence[int],
                 like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (3, B, L) of time, height, width -> cos, sin (B, 1, L, head_dim) in `like`'s dtype and device,
    rotate-half layout (both halves share a frequency). Frequencies in fp32 on the CPU, angles in fp32 on the device,
    as transformers computes them."""
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"mrope: position_ids {tuple(position_ids.shape)} are not (3, B, L)")
    if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope: mrope_section {list(mrope_section)} does not split head_dim / 2 = {head_dim // 2} "
                         f"frequencies into time, height and width sections")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(list(mrope_section)))  # (head_dim / 2,): 0, 1 or 2
    positions = position_ids.to(like.device).float().permute(1, 2, 0)[..., axis.to(like.device)]  # (B, L, d / 2)
    freqs = positions * inv_freq.to(like.device)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, head_dim)
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


def image_positions(start: int, t: int, h: int, w: int) -> torch.Tensor:
    """(3, t * h * w) time/height/width positions of one image's merged tokens (row-major), counted from `start`."""
    grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(grid).reshape(3, -1) + start


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None, *,
               image_token_id: int, vision_start_token_id: int,
               spatial_merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, L) with each image as t * (h / m) * (w / m) `image_token_id` placeholders right after a
    `vision_start_token_id` (m: spatial_merge_size), image_grid_thw (n, 3) the patch grids of all the images in
    order (row by row), attention_mask (B, L) of 1 and 0 (None: no padding) -> position_ids (3, B, L) and the deltas
    (B, 1): the first position after a row's last token minus its token count, which generated tokens add to their
    index. transformers' `Qwen2_5_VLModel.get_rope_index` for text and images."""
    b, n = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (b, n):
        raise ValueError(f"mrope: attention_mask {tuple(attention_mask.shape)} does not fit input_ids {(b, n)}")
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    used = 0  # images placed so far: the grids are taken in order, across the rows
    position_ids = torch.zeros(3, b, n, dtype=input_ids.dtype, device=input_ids.device)
    deltas = []
    for row in range(b):
        keep = torch.ones(n, dtype=torch.bool) if attention_mask is None else attention_mask[row].bool().cpu()
        ids = input_ids[row].cpu()[keep].tolist()
        if not ids:
            raise ValueError(f"mrope: row {row} has no tokens (its attention_mask is all 0)")
        positions, used = _row_positions(ids, grids, used, row, image_token_id, vision_start_token_id,
                                         spatial_merge_size)
        position_ids[:, row, keep.to(input_ids.device)] = positions.to(position_ids)
        deltas.append(int(positions.max()) + 1 - len(ids))
    if used != len(grids):
        raise ValueError(f"mrope: image_grid_thw has {len(grids)} images, input_ids {used}")
    return position_ids, torch.tensor(deltas, device=input_ids.device)[:, None]


def _row_positions(ids: list[int], grids: list[list[int]], used: int, row: int, image_token_id: int,
                   vision_start_token_id: int, merge: int) -> tuple[torch.Tensor, int]:
    """(3, len(ids)) positions of one row's tokens (padding removed), its images taking `grids[used:]` in order;
    and the number of images used after this row."""
    pieces, start, previous = [], 0, None
    for is_image, run in groupby(ids, key=lambda token: token == image_token_id):
        run = list(run)
        if not is_image:
            pieces.append(torch.arange(start, start + len(run)).expand(3, -1))
            start += len(run)
        else:
            if used == len(grids):
                raise ValueError(f"mrope: row {row} has more images than the {len(grids)} of image_grid_thw")
            if previous != vision_start_token_id:  # how transformers 4 finds images: each after a vision start
                raise ValueError(f"mrope: image {used} (row {row}) does not follow the vision start token "
                                 f"{vision_start_token_id}")
            t, h, w = grids[used]
            h, w = h // merge, w // merge
            if len(run) != t * h * w:
                raise ValueError(f"mrope: image {used} (row {row}) has {len(run)} placeholder tokens, its grid "
                                 f"{tuple(grids[used])} merged by {merge} gives {t * h * w}")
            pieces.append(image_positions(start, t, h, w))
            start, used = start + max(h, w), used + 1
        previous = run[-1]
    return torch.cat(pieces, dim=1), used
