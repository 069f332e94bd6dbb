"""T5 prompt encoding on CPU: our T5 encoder (diffsynth/models/t5_encoder.py) vs transformers' T5EncoderModel (what diffusers runs).

A mid-size T5 v1.1-style encoder (gated GELU, d_model 1024, d_ff 2816, 16 heads, 6 layers; T5-XXL is 4096
/ 10240 / 64 / 24) with random weights, one prompt of 512 tokens, fp32. Both models hold the same
weights; ours is built by `load_t5_encoder` from the state dict. Latency: alternating in one process,
median of the per-pair ratios.

    python benchmarks/text_encode.py   (DIFFSYNTH_BENCH_SMOKE=1: a tiny encoder, for the test suite)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Comparison, compare, emit, interleaved, run_worker, table  # noqa: E402

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
TOKENS, REPS = (16, 2) if SMOKE else (512, 7)
CONFIG = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=6, num_heads=16,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
if SMOKE:
    CONFIG.update(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)


def worker() -> None:
    import torch
    from transformers import T5Config, T5EncoderModel
    from diffsynth.models.flux_text_encoders import load_t5_encoder
    torch.manual_seed(0)
    ref = T5EncoderModel(T5Config(**CONFIG)).eval()
    ours = load_t5_encoder({k: v.clone() for k, v in ref.state_dict().items()}, CONFIG)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(1))
    fns = {"transformers": lambda: ref(ids).last_hidden_state, "ours": lambda: ours(ids)}
    with torch.inference_mode():
        a, b = fns["transformers"](), fns["ours"]()
        rel = ((a - b).abs().max() / a.abs().max()).item()
        times = interleaved(fns, REPS)
    emit({"times": times, "max_rel_diff": rel})


def main() -> Comparison:
    r = run_worker(__file__)
    row = compare(f"{TOKENS} tokens", r["times"], r["max_rel_diff"], reference="transformers")
    print(f"T5 encoder (d_model {CONFIG['d_model']}, {CONFIG['num_layers']} layers), {TOKENS} tokens, CPU fp32, "
          f"median of {REPS} alternating reps")
    print(table([[f"{row.reference_ms:.0f}", f"{row.ours_ms:.0f}", f"{row.ratio:.2f}", f"{row.diff:.1e}"]],
                ["transformers ms", "ours ms", "ours/transformers", "max rel diff"]))
    return row


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker()
    else:
        main()
