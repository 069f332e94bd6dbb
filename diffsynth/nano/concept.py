"""Train your own: a LoRA that teaches flux-nano a colour it has never seen, from a handful of drawings.

    python -m diffsynth.nano.concept --color purple --output outputs/purple-lora

draws the images, prints and then runs `diffsynth train --lora_base_model dit ...` on the shipped model (so it
can be rerun by hand), then generates prompts with the new word without and with the LoRA, writes both as
captioned grids (without-lora.png, with-lora.png) and reports how many come out in that colour.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from ..ops.files import save_image
from . import SHIPPED
from .demo import make_grid
from .evaluate import evaluate
from .shapes import COLORS, EXTRA_COLORS, POSITIONS, SHAPES, Example, prompt, write_dataset

# Positions x shapes cycled so that a handful of images covers every shape and position.
CHECK_TRIPLES = (("circle", "left"), ("square", "top"), ("triangle", "right"), ("circle", "bottom"))


def concept_examples(color: str, count: int) -> list[Example]:
    pairs = [(s, p) for p in POSITIONS for s in SHAPES]
    return [Example(color, *pairs[(i * 7) % len(pairs)], seed=i) for i in range(count)]


def lora_argv(data: Path, output: Path, root: Path, steps: int, rank: int, learning_rate: float,
              batch_size: int, seed: int) -> list[str]:
    from .model import T5_LENGTH, model_files
    from .shapes import SIZE
    return ["--dataset_base_path", str(data), "--height", str(SIZE), "--width", str(SIZE),
            "--model_paths", json.dumps(model_files(root)), "--lora_base_model", "dit", "--lora_rank", str(rank),
            "--learning_rate", str(learning_rate), "--batch_size", str(batch_size), "--dataset_repeat", "1000",
            "--num_epochs", "1",
            "--max_steps", str(steps), "--t5_sequence_length", str(T5_LENGTH), "--guidance", "3.5",
            "--cache_dir", str(output / "cache"), "--output_path", str(output), "--seed", str(seed),
            "--report_to", "none"]


GRIDS = ("without-lora.png", "with-lora.png")  # the check prompts' images, written into --output


def teach_color(color: str, output: Path, root: Path = SHIPPED, images: int = 8, steps: int = 150, rank: int = 8,
                learning_rate: float = 2e-3, batch_size: int = 4, seed: int = 0) -> dict:
    """Draw, train the LoRA, check it. Returns the command, the files written, the times and the colour hit
    rates without and with the LoRA."""
    from ..training import train
    from ..training.args import build_parser
    from .model import load_pipeline
    grids = [output / g for g in GRIDS]
    taken = [str(g) for g in grids if g.exists()]
    if taken:  # checked before anything is drawn or trained
        raise FileExistsError(f"{', '.join(taken)} already exist(s): give another --output")
    argv = lora_argv(output / "data", output, root, steps, rank, learning_rate, batch_size, seed)
    command = "diffsynth train " + shlex.join(argv)
    print(f"writes {output / 'data'}/, the LoRA in {output}/ and {', '.join(map(str, grids))}\n"
          f"training with:\n  {command}", flush=True)
    started = time.time()
    write_dataset(output / "data", concept_examples(color, images))
    result = train(build_parser().parse_args(argv))
    trained = time.time() - started
    lora = result["files"][-1]
    colors = {**COLORS, color: EXTRA_COLORS[color]}
    triples = [(color, *t) for t in CHECK_TRIPLES]
    pipe = load_pipeline(root)
    drawn: tuple[list, list] = ([], [])
    before = evaluate(pipe, triples, seeds=(0,), colors=colors, images_out=drawn[0])["color"]
    pipe.load_lora(pipe.dit, lora, alpha=1.0)
    after = evaluate(pipe, triples, seeds=(0,), colors=colors, images_out=drawn[1])
    for path, pictures in zip(grids, drawn):
        save_image(make_grid(pictures, [prompt(*t) for t in triples], columns=len(triples)), path, overwrite=False)
    return {"command": command, "lora": lora, "images": [str(g) for g in grids], "train_seconds": trained,
            "total_seconds": time.time() - started, "color_before": before, "color_after": after["color"],
            "position_after": after["position"], "shape_after": after["shape"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Teach flux-nano a new colour with a LoRA (CPU, minutes).")
    p.add_argument("--color", choices=sorted(EXTRA_COLORS), default="purple")
    p.add_argument("--output", default="outputs/nano-lora")
    p.add_argument("--model-dir", default=str(SHIPPED))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    report = teach_color(args.color, Path(args.output), Path(args.model_dir), args.images, args.steps)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
