"""Parallel generation: 1 device vs N devices (torch.distributed), same image.

On a machine with N GPUs and a FLUX.1-dev folder (diffusers or BFL layout with text encoders and VAE), or a
FLUX.2 release folder with `--pipeline flux2`:

    torchrun --nproc-per-node 2 benchmarks/parallel_gpu.py --model-dir /models/FLUX.1-dev [--parallel tensor]

Every rank loads the pipeline with `parallel="context"` (or "tensor") on its own GPU. After a warm-up, the
N-device generation is timed (all ranks); then rank 0 times the same generation alone, with context
parallelism switched off (context) or on a freshly loaded unsplit pipeline (tensor), while the other
ranks wait. Rank 0 prints both times, the speed-up and the largest pixel difference between the two
images (expected <= 1/255).

CPU smoke run (2 gloo processes on 127.0.0.1, the tiny random FLUX.1-dev or FLUX.2 [klein] model, 48x80 px,
2 steps):

    python benchmarks/parallel_gpu.py --smoke [--parallel tensor] [--pipeline flux2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from diffsynth.ops.names import PARALLEL_MODES  # noqa: E402

PROMPT = "a photo of a red cat sitting on a wooden table"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="FLUX.1 folder (FLUX.1-dev layout)")
    p.add_argument("--device", default="cuda", help="cuda (one GPU per rank) or cpu (gloo)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--t5-sequence-length", type=int, default=512)
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="context")
    p.add_argument("--pipeline", choices=("flux", "flux2"), default="flux",
                   help="FLUX.1 (FluxImagePipeline) or FLUX.2 (Flux2ImagePipeline) folder")
    p.add_argument("--smoke", action="store_true", help="2 gloo processes, tiny model, CPU (no GPU needed)")
    p.add_argument("--result-json", help="rank 0 also writes its numbers (ParallelResult) to this file")
    args = p.parse_args(argv)
    if not args.smoke and not args.model_dir:
        p.error("--model-dir is required (or --smoke)")
    return args


@dataclass
class ParallelResult:
    devices: int
    single_s: float           # one process, parallelism off
    split_s: float            # `devices` processes
    max_pixel_diff: float     # between the two images, in 1/255 steps


@dataclass
class SmokeResult:
    exit_code: int                   # the worst of the ranks'
    result: ParallelResult | None    # rank 0's numbers (None when it failed before writing them)


def load(args, parallel: str | None):
    import torch
    from diffsynth import Flux2ImagePipeline, FluxImagePipeline
    from diffsynth.cli import model_files_in
    from diffsynth.loading.model_config import ModelConfig
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cls = Flux2ImagePipeline if args.pipeline == "flux2" else FluxImagePipeline
    return cls.from_pretrained(
        torch_dtype=dtype, device=args.device, parallel=parallel,
        model_configs=[ModelConfig(path=p) for p in model_files_in(args.model_dir)])


def timed_generation(pipe, args) -> tuple[float, object]:
    import torch
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    start = time.perf_counter()
    text = {"t5_sequence_length": args.t5_sequence_length} if args.pipeline == "flux" else {}
    image = pipe(PROMPT, height=args.height, width=args.width, num_inference_steps=args.steps, seed=0,
                 output_type="pt", progress_bar_cmd=lambda x: x, **text)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter() - start, image


def run_rank(args) -> None:
    """One rank of the torchrun job (see the module docstring)."""
    import torch.distributed as dist
    from diffsynth.ops import parallel
    pipe = load(args, args.parallel)
    world, rank = dist.get_world_size(), dist.get_rank()
    timed_generation(pipe, argparse.Namespace(**{**vars(args), "steps": 1}))  # warm-up (kernels, allocator)
    split_s, split_image = timed_generation(pipe, args)
    parallel.disable_context_parallel()
    if args.parallel == "tensor":  # the split weights cannot be joined back: the reference loads anew
        del pipe
        pipe = load(args, None) if rank == 0 else None
    if rank == 0:
        timed_generation(pipe, argparse.Namespace(**{**vars(args), "steps": 1}))
        single_s, single_image = timed_generation(pipe, args)
        diff = (split_image - single_image).abs().max().item() * 255
        if args.result_json:
            Path(args.result_json).write_text(json.dumps(asdict(ParallelResult(world, single_s, split_s, diff))))
        print(f"| devices | seconds | speed-up |\n|---|---|---|\n| 1 | {single_s:.2f} | 1.00 |\n"
              f"| {world} | {split_s:.2f} | {single_s / split_s:.2f} |")
        print(f"{args.parallel} parallel, {args.height}x{args.width}, {args.steps} steps, {args.dtype}, "
              f"{pipe.device.type}; "
              f"max pixel difference {diff:.3f}/255")
    dist.barrier()
    parallel.shutdown()


def smoke(mode: str = "context", pipeline: str = "flux") -> SmokeResult:
    """The tiny model in a temporary folder, run as 2 local gloo processes."""
    from diffsynth.testing import build_tiny_flux
    from diffsynth.testing.distributed import launch_local
    from diffsynth.testing.tiny_flux2 import build_tiny_flux2
    with tempfile.TemporaryDirectory() as tmp:
        root = build_tiny_flux2(Path(tmp) / "FLUX.2-klein") if pipeline == "flux2" else \
            build_tiny_flux(Path(tmp) / "FLUX.1-dev")
        argv = [sys.executable, __file__, "--model-dir", str(root), "--device", "cpu", "--dtype", "fp32",
                "--height", "48", "--width", "80", "--steps", "2", "--t5-sequence-length", "77", "--parallel", mode,
                "--pipeline", pipeline, "--result-json", str(Path(tmp) / "result.json")]
        results = launch_local(argv, nprocs=2, timeout=300)
        written = Path(tmp) / "result.json"
        result = ParallelResult(**json.loads(written.read_text())) if written.is_file() else None
    for r in results:
        if r.returncode or r.rank == 0:
            print(f"--- rank {r.rank} (exit {r.returncode})\n{r.output}")
    return SmokeResult(max(r.returncode for r in results), result)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return smoke(args.parallel, args.pipeline).exit_code
    run_rank(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
