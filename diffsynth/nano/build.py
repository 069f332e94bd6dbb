"""Rebuild flux-nano from scratch: text encoders + tokenizers, the autoencoder, the dataset, the DiT
(full training with this project's trainer, the `diffsynth train` path), then the held-out evaluation.

    python -m diffsynth.nano.build                       # writes diffsynth/nano/flux-nano/ (the shipped model)
    python -m diffsynth.nano.build --output my-nano --work-dir outputs/my-nano

Every random choice has a fixed seed, so the same versions of torch & co rebuild the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..ops.files import load_state_dict, save_safetensors
from . import evaluate, model, shapes, vae

# The recipe (each value is recorded in BUILD.json).
# The autoencoder's part is vae.VAETraining's defaults (one source for this build and `python -m ...vae`).
RECIPE = {
    "seed": 0,
    **{f"vae_{k}": v for k, v in asdict(vae.VAETraining()).items() if k != "seed"},
    "images_per_triple": 8,
    "dit_steps": 3250, "dit_batch_size": 16, "dit_learning_rate": 1e-3, "dit_warmup_steps": 50, "guidance": 3.5,
    "dit_ema_decay": 0.995, "dit_max_grad_norm": 1.0,
}


def trainer_argv(work: Path, root: Path, r: dict) -> list[str]:
    """The `diffsynth train` arguments that train the DiT (full training, BFL key names out)."""
    data = work / "data"
    paths = [str(work / "init" / "flux1-dev.safetensors"), *model.model_files(root)[1:]]
    return ["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--height", str(shapes.SIZE), "--width", str(shapes.SIZE), "--model_paths", json.dumps(paths),
            "--trainable_models", "dit", "--full_format", "bfl", "--learning_rate", str(r["dit_learning_rate"]),
            "--weight_decay", "0", "--lr_scheduler", "cosine", "--lr_warmup_steps", str(r["dit_warmup_steps"]),
            "--batch_size", str(r["dit_batch_size"]), "--dataset_repeat", "100", "--num_epochs", "1",
            "--max_steps", str(r["dit_steps"]),
            "--t5_sequence_length", str(model.T5_LENGTH), "--guidance", str(r["guidance"]),
            "--cache_dir", str(work / "cache"), "--output_path", str(work / "dit"), "--seed", str(r["seed"]),
            "--ema_decay", str(r["dit_ema_decay"]), "--max_grad_norm", str(r["dit_max_grad_norm"]),
            "--report_to", "none"]


def train_autoencoder(root: Path, r: dict) -> dict:
    recipe = vae.VAETraining(seed=r["seed"], **{f.name: r[f"vae_{f.name}"] for f in fields(vae.VAETraining)
                                                if f.name != "seed"})
    encoder, decoder, summary = vae.train_vae(recipe)
    vae.save_ae(encoder, decoder, root / "ae.safetensors")
    return {**summary, **vae.latent_stats(encoder, decoder, next(vae.random_batches(64, r["seed"] + 1)))}


def train_dit(work: Path, root: Path, r: dict) -> dict:
    from ..training import train
    from ..training.args import build_parser
    examples = [shapes.Example(*t, i) for t in shapes.train_triples() for i in range(r["images_per_triple"])]
    shapes.write_dataset(work / "data", examples)
    model.write_initial_dit(work / "init" / "flux1-dev.safetensors", r["seed"])
    argv = trainer_argv(work, root, r)
    result = train(build_parser().parse_args(argv))
    # the EMA of the last step holds every DiT tensor (full training) in BFL names
    ema = next(f for f in reversed(result["files"]) if f.endswith("-ema.safetensors"))
    save_safetensors(dict(load_state_dict(ema)), root / "flux1-dev.safetensors",
                     metadata={"format": "pt"})
    losses = result["losses"]
    return {"command": "diffsynth train " + shlex.join(argv), "steps": result["steps"],
            "seconds": result["seconds"], "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def build(root: Path, work: Path, recipe: dict = RECIPE) -> dict:
    """Everything, in order; returns the report written to root/BUILD.json."""
    started = time.time()
    if work.exists():  # a rebuild starts from nothing (stale caches would hide changes)
        shutil.rmtree(work)
    root.mkdir(parents=True, exist_ok=True)
    model.write_text_encoders(root, recipe["seed"])
    report = {"recipe": recipe, "autoencoder": train_autoencoder(root, recipe)}
    report["dit"] = train_dit(work, root, recipe)
    pipe = model.load_pipeline(root)
    report["evaluation"] = evaluate.evaluate(pipe, list(shapes.HELD_OUT))
    report["train_set_check"] = evaluate.evaluate(pipe, shapes.train_triples()[::7], seeds=(0,))
    report["seconds"] = time.time() - started
    report["torch"] = torch.__version__
    return report


def build_markdown(report: dict) -> str:
    """BUILD.md: how this folder was made and how well it does, for people (BUILD.json has everything)."""
    e, t, a, d = report["evaluation"], report["train_set_check"], report["autoencoder"], report["dit"]
    recipe = "\n".join(f"| `{k}` | {v} |" for k, v in report["recipe"].items())
    note = f"\n{report['note']}.\n" if report.get("note") else ""
    return f"""# flux-nano build record

Rebuild (fixed seeds, from nothing; {report['seconds'] / 60:.1f} min wall time on the 2-core development CPU,
torch {report['torch']}):

```shell
{report['command']}
```
{note}
| recipe | value |
|---|---|
{recipe}

- Autoencoder: {a['steps']} steps, final L1 {a['final_l1']:.4f} ([-1, 1] scale), normalized latent std
  {a['latent_std']:.2f}, {a['seconds']:.0f} s.
- DiT: {d['steps']} steps of full training with this project's trainer, final loss {d['final_loss']:.4f},
  {d['seconds']:.0f} s. The trainer command it ran (the shipped DiT is its EMA file):

```shell
{d['command']}
```

## Evaluation

Held-out (color, shape, position) triples ({len(e['seeds'])} seeds each, {e['images']} images,
{e['steps']} sampling steps): **colour {e['color']:.0%}, position {e['position']:.0%}, shape {e['shape']:.0%}**.
Trained triples (every 7th, 1 seed, {t['images']} images): colour {t['color']:.0%}, position
{t['position']:.0%}, shape {t['shape']:.0%}.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Rebuild flux-nano from scratch and evaluate it on held-out prompts.")
    p.add_argument("--output", default=str(model.SHIPPED), help="model folder to write (FLUX.1-dev layout)")
    p.add_argument("--work-dir", default="outputs/nano-build", help="dataset, caches and trainer outputs")
    args = p.parse_args(argv)
    root = Path(args.output)
    report = build(root, Path(args.work_dir))
    # recorded because it matters: on the shared 2-core CPU, OMP_NUM_THREADS=1 trained ~7x faster than two
    # threads, whose OpenMP barriers wait for a descheduled sibling (measured while other jobs ran)
    threads = os.environ.get("OMP_NUM_THREADS")
    given = sys.argv[1:] if argv is None else argv
    report["command"] = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python -m diffsynth.nano.build" + \
        "".join(f" {shlex.quote(a)}" for a in given)
    from .text import write_bytes, write_json
    write_json(root / "BUILD.json", report)
    write_bytes(root / "BUILD.md", build_markdown(report).encode())
    e = report["evaluation"]
    print(f"held-out evaluation ({e['images']} images): colour {e['color']:.0%}, position {e['position']:.0%}, "
          f"shape {e['shape']:.0%}; built in {report['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
