"""Multi-device inference (ops/parallel.py): context- and tensor-parallel DiT on torch.distributed, here on
CPU with gloo.

The two-process tests start real ranks on 127.0.0.1 (torchrun's environment, see diffsynth/testing/
distributed.py) and compare the image to the one-process image: equal within 1/255.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from diffsynth.cli import main
from diffsynth.models.flux_dit import Extensions
from diffsynth.nano import SHIPPED
from diffsynth.ops import parallel
from diffsynth.testing.distributed import launch_local

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
# 77 text and 3x5 image tokens: neither splits evenly over 2 ranks (the padding path of the gathers)
ODD = ["--height", "48", "--width", "80", "--steps", "3", "--t5-sequence-length", "77", "--device", "cpu",
       "--dtype", "fp32"]


@pytest.fixture
def gloo_of_one():
    """A one-process gloo group in this process, left (and any parallel mode undone) afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    parallel.shutdown()


@pytest.fixture
def world_of_one(gloo_of_one):
    """Context parallelism on, over a one-process group."""
    parallel.enable_context_parallel()


def test_split_sizes_follow_tensor_split():
    for length, world in ((77, 2), (15, 2), (16, 4), (3, 4)):
        sizes = parallel.split_sizes(length, world)
        assert sizes == [len(c) for c in torch.arange(length).tensor_split(world)] and sum(sizes) == length


def test_interleave_shards_gives_each_rank_its_slice_of_every_part():
    fused = torch.arange(4 + 4 + 2 + 6.0)  # q, k, v, mlp of widths 4, 4, 2, 6 over 2 ranks
    out = parallel.interleave_shards(fused, (4, 4, 2, 6), 2)
    assert out.chunk(2)[0].tolist() == [0, 1, 4, 5, 8, 10, 11, 12] and sorted(out.tolist()) == fused.tolist()
    with pytest.raises(ValueError, match="over 4 ranks"):
        parallel.interleave_shards(fused, (4, 4, 2, 6), 4)


def test_generate_refuses_tensor_parallel_with_lora_before_loading(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x", "--parallel", "tensor",
                 "--lora", "x.safetensors", "--output", str(tmp_path / "x.png")] + ODD)
    err = capsys.readouterr().err
    assert code == 1 and "--parallel tensor does not combine with --lora" in err and "missing" not in err


def test_tensor_parallel_dit_over_one_rank_matches(gloo_of_one, one_thread):
    """The reordered fused projections and the DTensor column/row layers compute the same velocity."""
    from diffsynth.models.flux_dit import FluxDiT, dit_from_bfl, infer_dit_config
    from diffsynth.testing.tiny import tiny_dit_state_dict
    sd = dit_from_bfl(tiny_dit_state_dict())
    dit = FluxDiT(infer_dit_config(sd)).eval()
    dit.load_state_dict(sd)
    c = dit.config
    inputs = (torch.randn(1, 15, c.in_channels), torch.rand(1, 15, 3) * 4, torch.randn(1, 7, c.context_dim),
              torch.zeros(1, 7, 3), torch.full((1,), 0.7), torch.randn(1, c.pooled_dim), torch.full((1,), 3.5))
    with torch.no_grad():
        plain = dit(*inputs)
        dit.shard_tensor_parallel()
        split = dit(*inputs)
    assert type(dit.blocks[0].attn.a_to_qkv.weight).__name__ == "DTensor"
    torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-5)
    from diffsynth import FluxImagePipeline
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = dit
    for what, call in (("load_lora", lambda: pipe.load_lora(dit, {})), ("compile", pipe.compile),
                       ("enable_vram_management", pipe.enable_vram_management)):
        with pytest.raises(NotImplementedError, match=f'{what} does not work on a DiT split by parallel="tensor"'):
            call()


def test_parallel_outside_torchrun_names_torchrun(monkeypatch, tiny_configs):
    from diffsynth import FluxImagePipeline
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node N"):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=tiny_configs(),
                                          parallel="context")
    assert not parallel.context_parallel_enabled()
    with pytest.raises(NotImplementedError, match="vram_limit"):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=tiny_configs(),
                                          parallel="tensor", vram_limit=4)


def test_world_of_one_matches_plain_run(tiny_pipe, world_of_one, one_thread):
    call = dict(prompt="a cat", height=48, width=80, num_inference_steps=2, seed=3, t5_sequence_length=16,
                output_type="latent")
    split = tiny_pipe(**call)
    parallel.disable_context_parallel()
    assert torch.equal(split, tiny_pipe(**call))


@pytest.mark.parametrize("ext, named", [
    (Extensions(mask=torch.ones(1, 1, 20, 20, dtype=torch.bool)), "attention mask"),
    (Extensions(residual=lambda kind, i: None), "residuals"),
    (Extensions(attention=(lambda kind, i, q, rows: None,)), "attention additions")])
def test_unsplittable_extensions_are_refused(tiny_pipe, world_of_one, ext, named):
    dit = tiny_pipe.dit
    c = dit.config
    img, txt = torch.randn(1, 4, c.in_channels), torch.randn(1, 16, c.context_dim)
    with pytest.raises(NotImplementedError, match=named):
        dit(img, torch.zeros(1, 4, 3), txt, torch.zeros(1, 16, 3), torch.ones(1), torch.randn(1, c.pooled_dim),
            torch.full((1,), 3.5), ext=ext)


def test_fewer_image_tokens_than_processes_is_refused(world_of_one, monkeypatch):
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda group=None: 4)
    with pytest.raises(ValueError, match="3 image tokens cannot be split over 4 processes"):
        parallel.run_split_blocks(lambda t, i, r: i, torch.zeros(1, 8, 2), torch.zeros(1, 3, 2), torch.zeros(11, 1))


def test_attention_refuses_masks_inside_split_blocks(world_of_one):
    from diffsynth.ops.attention import attention
    q = torch.randn(1, 2, 4, 8)
    with parallel._attending([4]):
        with pytest.raises(NotImplementedError, match="EliGen"):
            attention(q, q, q, torch.ones(4, 4, dtype=torch.bool))
        assert torch.allclose(attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.slow  # two fresh interpreters importing torch: ~20-45 s on the shared 2-core machine
@pytest.mark.parametrize("mode", ["context", "tensor"])
def test_generate_two_processes_equals_one_flux_nano(tmp_path, mode):
    """`torchrun --nproc-per-node 2 --no-python diffsynth generate ... --parallel MODE` as torchrun runs it,
    without --seed: rank 0's random seed must reach rank 1 (else the ranks would start from different noise)."""
    args = ["generate", "--model-dir", str(SHIPPED), "--prompt", "a red circle on a blue background"] + ODD
    ranks = launch_local([sys.executable, "-m", "diffsynth.cli", *args, "--parallel", mode,
                          "--output", str(tmp_path / "split.png")], nprocs=2, timeout=300)
    assert [r.returncode for r in ranks] == [0, 0], "\n".join(r.output for r in ranks)
    assert "saved" in ranks[0].output and "saved" not in ranks[1].output  # rank 0 writes
    seed = json.loads(Image.open(tmp_path / "split.png").text["diffsynth"])["seed"]
    assert main(args + ["--seed", str(seed), "--output", str(tmp_path / "one.png")]) == 0
    assert np.abs(_pixels(tmp_path / "split.png") - _pixels(tmp_path / "one.png")).max() <= 1


@pytest.mark.slow
def test_benchmark_smoke_two_processes_equal_one_tiny_flux(capsys):
    """benchmarks/parallel_gpu.py on 2 gloo processes: from_pretrained(parallel="context") on the tiny FLUX.1
    model, then rank 0 alone with context parallelism off; the images agree within 1/255."""
    sys.path.insert(0, str(BENCH))
    try:
        import parallel_gpu
    finally:
        sys.path.remove(str(BENCH))
    smoke = parallel_gpu.smoke()
    assert smoke.exit_code == 0 and smoke.result.devices == 2
    assert smoke.result.single_s > 0 and smoke.result.split_s > 0
    assert smoke.result.max_pixel_diff <= 1.0
    assert "| 2 |" in capsys.readouterr().out  # the table still prints


@pytest.mark.parametrize("fails", [False, True])
def test_generate_waits_for_the_other_ranks_only_after_success(monkeypatch, fails):
    """`diffsynth generate --parallel`: a barrier before leaving the group after a successful run (no rank tears it
    down under another), none after an error (the other ranks may never reach it)."""
    from types import SimpleNamespace

    from diffsynth import cli

    def write(*args):
        if fails:
            raise RuntimeError("rank failed")
        return ["out.png"]
    calls = []
    monkeypatch.setattr(cli, "apply_folder_defaults", lambda args: None)
    monkeypatch.setattr(cli, "check_generation", lambda args: (["out.png"], {}))
    monkeypatch.setattr(cli, "model_paths", lambda args: [])
    monkeypatch.setattr(cli, "build_pipeline", lambda args, models: None)
    monkeypatch.setattr(cli, "write_images", write)
    monkeypatch.setattr(parallel, "shutdown", lambda wait_for_peers=True: calls.append(wait_for_peers))
    args = SimpleNamespace(parallel="context")
    if fails:
        with pytest.raises(RuntimeError, match="rank failed"):
            cli.cmd_generate(args)
    else:
        assert cli.cmd_generate(args) == ["out.png"]
    assert calls == [not fails]
