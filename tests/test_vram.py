"""VRAM management: the planner, the full-size FLUX.1-dev plan on the meta device, and per-layer
storage/compute casting with residency on the tiny pipeline (CPU stands in for the compute device)."""
import random

import pytest
import torch

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.loading import vram
from diffsynth.loading.components import in_loop_names
from diffsynth.ops.linear import Linear
from diffsynth.loading.vram import GB, Layer, plan_model, plan_vram
from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig

KW = dict(height=64, width=96, num_inference_steps=2, t5_sequence_length=16, seed=3,
          progress_bar_cmd=lambda x: x, output_type="latent")


# ----------------------------------------------------------------------------- planner

def test_plan_never_exceeds_budget_random():
    rng = random.Random(1234)
    for _ in range(2000):
        layers = [Layer(f"l{i}", rng.randint(1, 1000), rng.choice([0, rng.randint(1, 2000)]))
                  for i in range(rng.randint(0, 40))]
        budget = rng.randint(0, 30000)
        act = rng.choice([0, rng.randint(0, 5000)])
        plan = plan_vram(layers, budget, activation_bytes=act)
        assert sorted(plan.resident + plan.streamed) == sorted(x.name for x in layers)
        assert plan.resident_bytes + plan.streamed_bytes == sum(x.nbytes for x in layers)
        if plan.resident:
            assert plan.peak_bytes <= budget
        else:
            assert plan.peak_bytes == plan.min_peak_bytes
        assert plan.fits == (plan.peak_bytes <= budget)
        if plan.min_peak_bytes <= budget:  # whenever some plan fits, ours does
            assert plan.fits
        # the reported peak is the true peak of executing the layers in order
        on = set(plan.resident)
        true_peak = plan.resident_bytes + act + max(
            [x.compute_nbytes + (0 if x.name in on else x.nbytes) for x in layers], default=0)
        assert plan.peak_bytes == true_peak


def test_plan_edges_and_persistent_params():
    layers = [("a", 100, 0, 10), ("b", 300, 0, 30), ("c", 200, 0, 20)]
    assert plan_vram(layers, 10_000).streamed == []
    zero = plan_vram(layers, 0)
    assert zero.resident == [] and zero.streamed_bytes == 600 and zero.peak_bytes == 300 and not zero.fits
    assert plan_vram(layers, 0, max_resident_numel=40).resident == ["a", "b"]
    assert plan_vram(layers, 700).resident == ["a", "b", "c"]
    assert plan_vram(layers, 599).resident == ["a"]  # first fit against a reserve for the largest layer


@pytest.fixture(scope="module")
def meta_flux_dev():
    with torch.device("meta"):
        return FluxDiT(FluxDiTConfig())


def test_full_size_flux_dev_plans_on_meta(meta_flux_dev):
    dit = meta_flux_dev
    n = sum(p.numel() for p in dit.parameters())
    assert 11.8e9 < n < 12.0e9
    act = vram.estimate_activation_bytes("dit", dit, 1024, 1024)
    rows = {}
    for storage in (torch.bfloat16, torch.float8_e4m3fn):
        for card in (8, 12, 24):
            budget = int((card - 0.5) * GB)
            plan = plan_model(dit, budget, torch.bfloat16, storage_dtype=storage, activation_bytes=act)
            assert plan.fits and plan.peak_bytes <= budget
            rows[storage, card] = plan
    assert rows[torch.bfloat16, 24].streamed == []  # 23.8e9 bytes (22.2 GiB) + activations fit 23.5 GiB
    assert rows[torch.bfloat16, 8].streamed_bytes > rows[torch.bfloat16, 12].streamed_bytes > 10 * GB
    assert rows[torch.float8_e4m3fn, 12].streamed and rows[torch.float8_e4m3fn, 8].streamed_bytes > 4 * GB
    q4 = plan_model(dit, int(7.5 * GB), torch.bfloat16, gguf_type="Q4_K", activation_bytes=act)
    assert q4.streamed == [] and q4.resident_bytes < 7 * GB

    pipe = FluxImagePipeline(device="cuda", torch_dtype=torch.bfloat16)  # nothing is allocated
    pipe.dit = dit
    plans = pipe.vram_plan(12, storage_dtype=torch.float8_e4m3fn)
    assert list(plans) == [("dit",)] and plans["dit",].fits
    assert "resident" in plans["dit",].summary()


# ----------------------------------------------------------------------------- pipeline

def configs(root, **kw):
    return [ModelConfig(path=str(root / p), **kw) for p in
            ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")]


@pytest.fixture(scope="module")
def fp8_pipe(tiny_root):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs(
        tiny_root, offload_device="cpu", offload_dtype=torch.float8_e4m3fn))


def test_limits_change_residency_not_results(fp8_pipe):
    pipe = fp8_pipe
    base = pipe("a cat", **KW)  # before enabling: every layer streams from storage
    full = pipe.vram_plan(1000)
    dit_plan = full["dit",]
    assert dit_plan.streamed == []
    results, resident = [], []
    need = dit_plan.peak_bytes / GB
    small = (dit_plan.min_peak_bytes + dit_plan.resident_bytes / 2) / GB
    for limit in (0, small + 0.5, need + 0.5, None):
        plans = pipe.enable_vram_management(vram_limit=limit)
        p = plans["dit",]
        assert p.peak_bytes <= p.budget_bytes or not p.resident
        units = dict(vram.units(pipe.dit))
        assert {"dit." + n for n, u in units.items() if u.resident} == set(p.resident)
        resident.append(len(p.resident))
        results.append(pipe("a cat", **KW))
    assert resident[0] == 0 and 0 < resident[1] < resident[2] == len(units) and resident[3] == len(units)
    for r in results:
        assert torch.equal(r, base)
    assert pipe.dit.blocks[0].attn.a_to_qkv.weight.dtype == torch.float8_e4m3fn


def test_default_limit_is_free_memory(fp8_pipe, monkeypatch):
    seen = []
    monkeypatch.setattr(vram, "device_free_bytes", lambda d: seen.append(d) or 3 * GB)
    plans = fp8_pipe.enable_vram_management(vram_buffer=0.5)
    assert seen and all(p.budget_bytes == int(2.5 * GB) for p in plans.values())


def test_models_move_on_and_off_per_unit(fp8_pipe, monkeypatch):
    pipe = fp8_pipe
    pipe.enable_vram_management(vram_limit=1000)
    moves = []
    monkeypatch.setattr(vram, "move_unit", lambda unit, device: moves.append((unit, device.type)))
    owner = {id(u): name for name in pipe.vram_models for _, u in vram.units(getattr(pipe, name))}
    calls = []
    original = pipe.load_models_to_device
    monkeypatch.setattr(pipe, "load_models_to_device", lambda names: calls.append(tuple(names)) or original(names))
    pipe("a cat", **{**KW, "output_type": "pt"})
    assert ("text_encoder_1", "text_encoder_2") in calls and in_loop_names() in calls and calls[-1] == ("vae_decoder",)
    onloaded = [owner[id(u)] for u, _ in moves]
    assert {"text_encoder_1", "text_encoder_2", "dit", "vae_decoder"} <= set(onloaded)
    assert "vae_encoder" not in onloaded and ("vae_encoder",) not in calls  # txt2img needs no encoder
    assert all(device == "cpu" for _, device in moves)  # compute and storage are both the CPU here
    assert {name for name, mm in pipe.vram_models.items() if mm.onloaded} == {"vae_decoder"}
    pipe.load_models_to_device(())
    assert not any(mm.onloaded for mm in pipe.vram_models.values())


def test_num_persistent_param_in_dit(fp8_pipe):
    plans = fp8_pipe.enable_vram_management(vram_limit=0, num_persistent_param_in_dit=5000)
    p = plans["dit",]
    kept = [u for n, u in vram.units(fp8_pipe.dit) if "dit." + n in p.resident]
    assert kept and sum(x.numel() for u in kept for x in u.parameters()) <= 5000
    assert plans["vae_decoder",].resident == []


def test_forward_hooks_survive_casting(fp8_pipe):
    """Hot-loaded LoRAs are forward hooks on nn.Linear: cast layers are still nn.Linear and run them."""
    layer = fp8_pipe.dit.blocks[0].attn.a_to_qkv
    assert isinstance(layer, torch.nn.Linear) and isinstance(layer, vram.CastLinear)
    base = fp8_pipe("a cat", **KW)
    handle = layer.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    try:
        silenced = fp8_pipe("a cat", **KW)
    finally:
        handle.remove()
    weight, bias = layer.weight.data, layer.bias.data
    layer.weight.data, layer.bias.data = torch.zeros_like(weight), torch.zeros_like(bias)  # zero is exact in fp8
    try:  # oracle: a hook zeroing the layer's output == the layer with zero weights
        torch.testing.assert_close(silenced, fp8_pipe("a cat", **KW), rtol=0, atol=0)
    finally:
        layer.weight.data, layer.bias.data = weight, bias
    assert (silenced - base).abs().max() > 1e-3
    assert torch.equal(fp8_pipe("a cat", **KW), base)


def test_models_without_offload_are_untouched(tiny_pipe):
    assert tiny_pipe.vram_models == {}
    assert type(tiny_pipe.dit.blocks[0].attn.a_to_qkv) is Linear


def test_hotloaded_lora_on_fp8_storage(fp8_pipe, tiny_pipe):
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name in ("blocks.0.attn.a_to_qkv", "single_blocks.0.proj_out"):
        out_f, in_f = tiny_pipe.dit.get_submodule(name).weight.shape
        lora[f"{name}.lora_A.weight"] = torch.randn(2, in_f, generator=g) * 0.3
        lora[f"{name}.lora_B.weight"] = torch.randn(out_f, 2, generator=g) * 0.3
    base, ref_base = fp8_pipe("a cat", **KW), tiny_pipe("a cat", **KW)
    for pipe in (fp8_pipe, tiny_pipe):
        pipe.load_lora(pipe.dit, lora, hotload=True)
    try:
        got, expected = fp8_pipe("a cat", **KW), tiny_pipe("a cat", **KW)
    finally:
        fp8_pipe.clear_lora()
        tiny_pipe.clear_lora()
    assert (got - expected).norm() / expected.norm() < 0.05  # the fp8 error, as without LoRA
    assert (got - base).norm() > 0.5 * (expected - ref_base).norm()  # the LoRA acts
    assert torch.equal(fp8_pipe("a cat", **KW), base)


def test_img2img_onloads_the_vae_encoder(fp8_pipe, monkeypatch):
    from PIL import Image
    pipe = fp8_pipe
    pipe.enable_vram_management(vram_limit=1000)
    calls = []
    original = pipe.load_models_to_device
    monkeypatch.setattr(pipe, "load_models_to_device", lambda names: calls.append(tuple(names)) or original(names))
    pipe("a cat", input_image=Image.new("RGB", (96, 64), (90, 20, 200)), denoising_strength=0.5, **KW)
    assert ("vae_encoder",) in calls


# ----------------------------------------------------------------------------- page-locked streaming

class FakeArena(vram.PinnedArena):
    """PinnedArena over ordinary memory (no CUDA here), recording the blocks it allocates."""

    def __init__(self, chunk_bytes):
        self.blocks = []
        super().__init__(alloc=lambda n: self.blocks.append(torch.empty(n, dtype=torch.uint8)) or self.blocks[-1],
                         chunk_bytes=chunk_bytes)


def test_pinned_arena_packs_tensors_into_chunks():
    arena = FakeArena(chunk_bytes=4096)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g).to(dtype) for n, dtype in
               [(100, torch.float32), (333, torch.bfloat16), (7, torch.float32), (600, torch.float32),
                (2000, torch.float32), (50, torch.float16)]]
    tensors.append(torch.randn(4, 8, generator=g).t())  # not contiguous
    copies = [arena.copy_in(t) for t in tensors]
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t)
    # at 0, 512, 1536, then 2048 + 2400 > 4096: a second chunk; the 8000-byte tensor gets its own block; the
    # last two fit the second chunk after the 2400 bytes
    assert [b.numel() for b in arena.blocks] == [4096, 4096, 8000]
    starts = [c.data_ptr() - b.data_ptr() for c in copies for b in arena.blocks
              if 0 <= c.data_ptr() - b.data_ptr() < b.numel()]
    assert len(starts) == len(copies) and all(s % vram.PIN_ALIGN == 0 for s in starts)


def test_pin_streamed_moves_only_streamed_weights_in_place(fp8_pipe):
    pipe = fp8_pipe
    plans = pipe.enable_vram_management(vram_limit=0, num_persistent_param_in_dit=5000)
    before = pipe("a cat", **KW)
    resident = pipe.vram_models["dit"].resident
    params = {n: (p, p.data_ptr()) for n, p in pipe.dit.named_parameters()}
    arena = FakeArena(chunk_bytes=1 << 20)
    moved = vram.pin_streamed(pipe.dit, resident, arena)
    in_arena = lambda p: any(0 <= p.data_ptr() - b.data_ptr() < b.numel() for b in arena.blocks)  # noqa: E731
    for unit_name, unit in vram.units(pipe.dit):
        for p in unit.parameters():
            assert in_arena(p) == (unit_name not in resident), unit_name
    assert dict(pipe.dit.named_parameters()).keys() == params.keys()
    assert all(p is params[n][0] for n, p in pipe.dit.named_parameters())  # same Parameter objects
    assert moved == plans["dit",].streamed_bytes > 0
    assert torch.equal(pipe("a cat", **KW), before)
