"""`pipe.compile()` on the CPU: our DiT step regionally compiled (inductor) against the same DiT eager.

The mid-size FLUX.1 DiT of dit_step.py and the mid-size FLUX.2 DiT of flux2_step.py (2 double + 4 single blocks,
width 768, 1024 image + 512 text tokens: a 512x512 image), fp32 and bf16. Each case runs in a fresh process
(inductor's caches are per process and on disk: the disk cache is pointed at a fresh folder, so the first call
pays the whole compilation, as a user's first run does). The blocks are compiled exactly as
`FluxImagePipeline.compile()` / `Flux2ImagePipeline.compile()` compile them. Reported: the first compiled call
(compilation included), then the median of alternating eager/compiled rounds and the median of per-round ratios,
and the relative difference of the two outputs.

    python benchmarks/compile_cpu.py [fp32] [bf16]   (DIFFSYNTH_BENCH_SMOKE=1: tiny sizes, aot_eager backend)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Comparison, compare, emit, interleaved, run_worker, table  # noqa: E402

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
REPS = 2 if SMOKE else 6


def models_and_inputs(family: str, dtype):
    """Two copies of our DiT with the same weights (one stays eager) and a call for each."""
    if family == "flux1":
        import dit_step as bench
        from diffsynth.pipelines.flux_image import FluxImagePipeline as Pipeline
        make = lambda model: bench.runner("ours", model, dtype)  # noqa: E731
    else:
        import flux2_step as bench
        from diffsynth.pipelines.flux2_image import Flux2ImagePipeline as Pipeline
        make = lambda model: bench.runner("ours", model, dtype, 0)  # noqa: E731
    eager, compiled = bench.build("ours", dtype), bench.build("ours", dtype)
    return make(eager), make(compiled), compiled, Pipeline.compiled_blocks


def worker(family: str, dtype_name: str) -> None:
    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache, torch.no_grad():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold start, as a first run (removed afterwards)
        eager, compiled, model, names = models_and_inputs(family, dtype)
        for name in names:  # what pipe.compile() does
            for block in getattr(model, name):
                block.compile(**({"backend": "aot_eager"} if SMOKE else {}))
        t = time.perf_counter()
        b = compiled()
        first = time.perf_counter() - t
        a = eager()
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        times = interleaved({"eager": eager, "ours": compiled}, REPS)
    emit({"first_s": first, "times": times, "rel_diff": rel})


@dataclass
class CompileRow:
    family: str
    dtype: str
    first_call_s: float  # the first compiled call, compilation included
    step: Comparison     # reference: eager; ours: compiled; diff: relative L2 difference


def main(dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[CompileRow]:
    rows = []
    cases = [("flux1", "fp32"), ("flux2", "fp32")] if SMOKE else [(f, d) for f in ("flux1", "flux2") for d in dtypes]
    for family, dtype in cases:
        out = run_worker(__file__, family, dtype)
        rows.append(CompileRow(family, dtype, out["first_s"],
                               compare(family, out["times"], out["rel_diff"], reference="eager")))
    print("pipe.compile() on the CPU: one DiT step, mid DiT (2+4 blocks, width 768), 1024+512 tokens, "
          f"median of {REPS} alternating rounds")
    print(table([[r.family, r.dtype, f"{r.first_call_s:.1f}", f"{r.step.reference_ms:.0f}", f"{r.step.ours_ms:.0f}",
                  f"{r.step.ratio:.2f}", f"{r.step.diff:.1e}"] for r in rows],
                ["DiT", "dtype", "first compiled call s", "eager ms", "compiled ms", "compiled/eager", "relative diff"]))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main(tuple(sys.argv[1:]) or ("fp32", "bf16"))
