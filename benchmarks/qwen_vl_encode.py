"""Qwen2.5-VL prompt encoding on CPU (Step1X-Edit's and Nexus-Gen's encoder): our model (diffsynth/models/qwen_vl.py)
vs transformers' Qwen2_5_VLModel, same random weights, same processor outputs.

A mid-size Qwen2.5-VL: vision tower 4 blocks of width 1280 (16 heads, the 7B's vision width; one full-attention
block), language model 4 layers of width 1536 (12 heads of 128, 2 key/value heads, the 7B's M-RoPE sections); one
448x448 image (1024 patches, 256 image tokens) and a short prompt through the tiny test folder's processor. Both
models hold the same weights; ours is built by `load_qwen_vl` from transformers' state dict. Latency: alternating
in one process, median of the per-pair ratios; fp32 and bf16, each in a fresh process.

    python benchmarks/qwen_vl_encode.py [fp32] [bf16]   (DIFFSYNTH_BENCH_SMOKE=1: tiny sizes, for the test suite)
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Comparison, compare, emit, interleaved, run_worker, table  # noqa: E402

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
SIDE, REPS = (56, 2) if SMOKE else (448, 5)
TEXT = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=12,
            num_key_value_heads=2, mrope_section=[16, 24, 24])
VISION = dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[3],
              window_size=112)


def config() -> dict:
    from diffsynth.testing.tiny_qwen import tiny_qwen_config
    c = tiny_qwen_config()  # the tiny folder's token ids and layout; mid-size widths unless smoke
    if SMOKE:
        return c
    c.update({k: v for k, v in TEXT.items() if k != "mrope_section"})
    c["rope_scaling"] = {**c["rope_scaling"], "mrope_section": TEXT["mrope_section"]}
    c["vision_config"] = {**c["vision_config"], **VISION, "out_hidden_size": TEXT["hidden_size"]}
    return c


def worker(dtype_name: str) -> None:
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from diffsynth.models.qwen_vl import QwenVLProcessor, hidden_states, load_qwen_vl, right_pad
    from diffsynth.testing.tiny_qwen import build_tiny_qwen_vl
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    cfg = config()
    ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg)).eval().to(dtype)
    ours = load_qwen_vl({k: v.clone() for k, v in ref.state_dict().items()}, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        proc = QwenVLProcessor.from_folder(build_tiny_qwen_vl(Path(tmp) / "q"))
    g = torch.Generator().manual_seed(1)
    image = Image.fromarray((torch.rand(SIDE, SIDE, 3, generator=g) * 255).byte().numpy())
    vision = proc.images([image], SIDE * SIDE, SIDE * SIDE)
    text = proc.chat([{"type": "image", "image": image}, {"type": "text", "text": "make the sky a deep red"}])
    ids, mask = right_pad([proc.ids(proc.expand_image_tokens(text, vision["image_grid_thw"]))], 0)
    pixels, grid = vision["pixel_values"], vision["image_grid_thw"]

    def theirs():
        ref.model.rope_deltas = None  # a cached offset from the previous call would shift the positions
        return ref.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                         mm_token_type_ids=(ids == cfg["image_token_id"]).int(), use_cache=False).last_hidden_state
    fns = {"transformers": theirs, "ours": lambda: hidden_states(ours, ids, mask, pixels, grid, torch.device("cpu"))}
    with torch.inference_mode():
        a, b = fns["transformers"]().float(), fns["ours"]().float()
        rel = ((a - b).norm() / a.norm()).item()
        times = interleaved(fns, REPS)
    emit({"times": times, "rel_diff": rel, "tokens": ids.shape[1], "patches": pixels.shape[0]})


def main(dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[Comparison]:
    rows, shape = [], None
    for dtype in dtypes:
        r = run_worker(__file__, dtype)
        rows.append(compare(dtype, r["times"], r["rel_diff"], reference="transformers"))
        shape = (r["patches"], r["tokens"])
    c = config()
    print(f"Qwen2.5-VL encode (vision {c['vision_config']['depth']} x {c['vision_config']['hidden_size']}, language "
          f"model {c['num_hidden_layers']} x {c['hidden_size']}), {shape[0]} patches, {shape[1]} tokens, CPU, "
          f"median of {REPS} alternating reps")
    print(table([[r.case, f"{r.reference_ms:.0f}", f"{r.ours_ms:.0f}", f"{r.ratio:.2f}", f"{r.diff:.1e}"] for r in rows],
                ["dtype", "transformers ms", "ours ms", "ours/transformers", "relative diff"]))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main(tuple(sys.argv[1:]) or ("fp32", "bf16"))
