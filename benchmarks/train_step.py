"""LoRA training-step throughput and peak memory: ours vs a diffusers-style step.

Both sides use the same random DiT weights (diffusers' FluxTransformer2DModel, converted to our layout),
PEFT LoRA of the same rank on every linear layer of the double and single blocks, the same pre-encoded
inputs (latents and text embeddings, as with a latent cache), the same sigma sampling and AdamW.
A step = forward + flow-matching loss + backward + optimizer step. Each variant runs in its own process
so peak memory (ru_maxrss on CPU, torch.cuda.max_memory_allocated on GPU) is not shared; "step MiB" is
the memory the training steps add on top of the loaded model (sampled RSS on CPU, allocator peak on GPU).

    python benchmarks/train_step.py                 # tiny and mid sizes, CPU or the first GPU
    python benchmarks/train_step.py --sizes mid --steps 10 --rank 32
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch

SIZES = {
    # the test suite's tiny model (64x64 images, 16 image tokens, 32 text tokens)
    "tiny": dict(hidden=32, heads=2, double=2, single=2, context=32, pooled=32, axes=(4, 6, 6), image=64, text=32),
    # FLUX.1's head size and rotary split, fewer/narrower blocks: 256x256 images (256 tokens), 128 text tokens
    "mid": dict(hidden=512, heads=4, double=2, single=4, context=1024, pooled=768, axes=(16, 56, 56), image=256,
                text=128),
}
OUR_TARGETS = ["a_to_qkv", "b_to_qkv", "ff_a.0", "ff_a.2", "ff_b.0", "ff_b.2", "a_to_out", "b_to_out", "proj_out",
               "norm.linear", "norm1_a.linear", "norm1_b.linear", "to_qkv_mlp"]
DIFFUSERS_TARGETS = (r".*(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|"
                     r"add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|"
                     r"norm1\.linear|norm1_context\.linear|norm\.linear|proj_mlp|proj_out)")


def diffusers_transformer(size: dict):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=size["double"],
                                   num_single_layers=size["single"], attention_head_dim=size["hidden"] // size["heads"],
                                   num_attention_heads=size["heads"], joint_attention_dim=size["context"],
                                   pooled_projection_dim=size["pooled"], guidance_embeds=True,
                                   axes_dims_rope=size["axes"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def inputs(size: dict, device, dtype) -> dict:
    from diffsynth.models.flux_dit import image_ids
    g = torch.Generator().manual_seed(1)
    h = w = size["image"] // 8
    return {"input_latents": torch.randn(1, 16, h, w, generator=g).to(device, dtype),
            "noise": torch.randn(1, 16, h, w, generator=g).to(device, dtype),
            "prompt_emb": torch.randn(1, size["text"], size["context"], generator=g).to(device, dtype),
            "pooled_prompt_emb": torch.randn(1, size["pooled"], generator=g).to(device, dtype),
            "text_ids": torch.zeros(1, size["text"], 3, device=device),
            "image_ids": image_ids(h, w, 1, device=device), "guidance": torch.ones(1, device=device)}


def upcast_lora(model) -> list[torch.nn.Parameter]:
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def our_step_fn(size: dict, rank: int, device, dtype):
    from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_from_diffusers
    from diffsynth.pipelines.flux_image import FluxImagePipeline
    from diffsynth.training.module import FluxTrainingModule
    sd = dit_from_diffusers(diffusers_transformer(size).state_dict())
    dit = FluxDiT(FluxDiTConfig(hidden_size=size["hidden"], num_heads=size["heads"], num_double_blocks=size["double"],
                                num_single_blocks=size["single"], context_dim=size["context"],
                                pooled_dim=size["pooled"], axes_dim=size["axes"]))
    dit.load_state_dict(sd)
    pipe = FluxImagePipeline(device=device, torch_dtype=dtype)
    pipe.dit = dit.to(device, dtype)
    module = FluxTrainingModule(pipe, lora_base_model="dit", lora_target_modules=OUR_TARGETS, lora_rank=rank)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = inputs(size, device, dtype)

    def step() -> float:
        loss = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, sum(p.numel() for p in params)


def diffusers_step_fn(size: dict, rank: int, device, dtype):
    from peft import LoraConfig
    from diffsynth.models.flux_dit import patchify
    from diffsynth.training.schedule import shifted_uniform
    model = diffusers_transformer(size).to(device, dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=DIFFUSERS_TARGETS))
    params = upcast_lora(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    b = inputs(size, device, dtype)

    def step() -> float:  # the diffusers DreamBooth-LoRA recipe on pre-encoded inputs
        x0, noise = b["input_latents"].float(), b["noise"].float()
        sigma, weight = shifted_uniform(1, 0)
        sigma, weight = sigma.to(device), weight.to(device)
        noisy = ((1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise).to(dtype)
        pred = model(hidden_states=patchify(noisy), timestep=sigma, guidance=b["guidance"],
                     pooled_projections=b["pooled_prompt_emb"], encoder_hidden_states=b["prompt_emb"],
                     txt_ids=b["text_ids"][0], img_ids=b["image_ids"][0], return_dict=False)[0]
        loss = (weight * (pred.float() - patchify(noise - x0)).pow(2).mean(dim=(1, 2))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, sum(p.numel() for p in params)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RssSampler(threading.Thread):
    """Highest resident set size seen while training steps run (CPU; ru_maxrss alone also counts setup)."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.process, self.interval, self.peak, self.running = psutil.Process(), interval, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)


def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed setup memory back so the baseline RSS is honest
    except OSError:
        pass


def worker(variant: str, size_name: str, rank: int, steps: int, warmup: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    make = our_step_fn if variant == "ours" else diffusers_step_fn
    step, n_params = make(SIZES[size_name], rank, device, dtype)
    release_free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before, sampler = psutil.Process().memory_info().rss, RssSampler()
        sampler.start()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        training = torch.cuda.max_memory_allocated(device) - before
    else:
        sampler.running = False
        sampler.join()
        training = sampler.peak - before
    return {"variant": variant, "size": size_name, "device": device.type, "lora_params": n_params,
            "step_s": statistics.median(times), "peak_mb": peak_memory_mb(device), "train_mb": training / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=0, help="measured steps (default: 30 tiny, 8 mid)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="alternate the two variants this many times and keep each one's best run (noisy hosts)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.rank, args.steps, args.warmup)))
        return
    print(f"{'size':6} {'variant':10} {'LoRA params':>12} {'step (s)':>10} {'steps/s':>8} {'peak MiB':>9} "
          f"{'step MiB':>9}")
    for size in args.sizes.split(","):
        steps = args.steps or (30 if size == "tiny" else 8)
        rows = {}
        for _ in range(args.repeats):
            for variant in ("ours", "diffusers"):
                out = subprocess.run([sys.executable, __file__, "--worker", variant, "--size", size, "--rank",
                                      str(args.rank), "--steps", str(steps), "--warmup", str(args.warmup),
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if variant not in rows or r["step_s"] < rows[variant]["step_s"]:
                    rows[variant] = r
        for variant, r in rows.items():
            print(f"{size:6} {variant:10} {r['lora_params']:>12,} {r['step_s']:>10.4f} {1 / r['step_s']:>8.2f} "
                  f"{r['peak_mb']:>9.0f} {r['train_mb']:>9.1f}")
        o, d = rows["ours"], rows["diffusers"]
        mem = "RSS" if o["device"] == "cpu" else "allocated"
        print(f"{size:6} ratio ours/diffusers: step time {o['step_s'] / d['step_s']:.2f}x "
              f"(throughput {d['step_s'] / o['step_s']:.2f}x), peak {mem} {o['peak_mb'] / d['peak_mb']:.2f}x, "
              f"memory added by training steps {o['train_mb'] / max(d['train_mb'], 1e-9):.2f}x [{o['device']}]")


if __name__ == "__main__":
    main()
