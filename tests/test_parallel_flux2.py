"""Context and tensor parallelism of the FLUX.2 DiT (ops/parallel.py): 2 gloo processes equal 1 process."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffsynth.ops import parallel
from diffsynth.testing.distributed import launch_local

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

# Every rank: the plain output, then context-parallel, then tensor-parallel, on the same inputs
# (7 text, 15 target and 6 reference tokens: no stream splits evenly over 2 ranks).
WORKER = """
import torch
from diffsynth.ops import parallel
from diffsynth.testing.distributed import tiny_flux2_outputs
import torch.distributed as dist
dist.init_process_group("gloo")
plain, context, tensor = tiny_flux2_outputs()
if dist.get_rank() == 0:
    print("context", (context - plain).abs().max().item(), "tensor", (tensor - plain).abs().max().item())
parallel.shutdown()
"""


def test_flux2_dit_over_one_rank_matches():
    from diffsynth.testing.distributed import tiny_flux2_outputs
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain, context, tensor = tiny_flux2_outputs()
    finally:
        parallel.shutdown()
    torch.testing.assert_close(context, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tensor, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flux2_dit_two_processes_equal_one():
    ranks = launch_local([sys.executable, "-c", WORKER], nprocs=2, timeout=300)
    assert [r.returncode for r in ranks] == [0, 0], "\n".join(r.output for r in ranks)
    words = ranks[0].output.split()
    assert float(words[words.index("context") + 1]) < 1e-5 and float(words[words.index("tensor") + 1]) < 1e-5


@pytest.mark.slow
def test_flux2_pipeline_two_processes_equal_one(capsys):
    """benchmarks/parallel_gpu.py's smoke run on the tiny FLUX.2 [klein] folder: Flux2ImagePipeline.from_pretrained(
    parallel="context") on 2 gloo processes, then rank 0 alone; the images agree within 1/255."""
    sys.path.insert(0, str(BENCH))
    try:
        import parallel_gpu
    finally:
        sys.path.remove(str(BENCH))
    smoke = parallel_gpu.smoke("context", "flux2")
    assert smoke.exit_code == 0 and smoke.result.devices == 2 and smoke.result.split_s > 0
    assert smoke.result.max_pixel_diff <= 1.0
    assert "max pixel difference" in capsys.readouterr().out  # the report still prints
