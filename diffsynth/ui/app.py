"""The Gradio page: Generate, Edit / condition and Train tabs over one loaded pipeline.

Errors a person can fix reach the page as messages (gr.Error); generations share one queue slot, so a
second browser tab waits for the first one's image; Stop and the training controls never wait for it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from ..ops.images import convert_image
from . import conditions as cond
from .files import Sandbox, add_lora, read_image, slug, write_upload_dataset
from .jobs import Cancelled, Generator, Request
from .training import TrainingRun, TrainSettings

USER_ERRORS = (ValueError, TypeError, RuntimeError, FileNotFoundError, FileExistsError, ImportError, OSError)
LORA_SLOTS = 2
NANO_EXAMPLE = "purple"  # the colour the flux-nano example dataset teaches (README: "Train your own in minutes")


@dataclass
class AppState:
    generator: Generator
    sandbox: Sandbox
    models: list[str]  # the model paths `diffsynth train` gets
    kinds: set[str]  # the Edit tab's conditions the models can use
    nano: bool  # flux-nano is served: grammar hints, the example dataset
    height: int
    width: int
    steps: int
    training: TrainingRun | None = None
    training_lock: threading.Lock = field(default_factory=threading.Lock)


def message(error: Exception) -> gr.Error:
    """The page's message for a failed action: the text only, never a traceback."""
    return gr.Error(str(error) or type(error).__name__, print_exception=False)


def build_app(state: AppState) -> gr.Blocks:
    with gr.Blocks(title="diffsynth") as app:
        gr.Markdown("## diffsynth" + (" · flux-nano (draws prompts such as \"a red circle on the left\")"
                                      if state.nano else ""))
        with gr.Tab("Generate"):
            gen = generate_tab(state)
        with gr.Tab("Edit / condition"):
            edit = edit_tab(state)
        with gr.Tab("Train"):
            train_tab(state, gen["loras"])
        wire_generation(state, gen, edit)
    return app


def generate_tab(state: AppState) -> dict:
    c: dict = {}
    with gr.Row():
        with gr.Column(scale=3):
            c["prompt"] = gr.Textbox(label="Prompt", lines=2,
                                     placeholder="a red circle on the left" if state.nano else "a cat on a sofa")
            c["negative"] = gr.Textbox(label="Negative prompt", placeholder="used when CFG scale > 1")
            with gr.Row():
                c["width"] = gr.Number(label="Width", value=state.width, precision=0)
                c["height"] = gr.Number(label="Height", value=state.height, precision=0)
                c["steps"] = gr.Slider(1, 100, value=state.steps, step=1, label="Steps")
            with gr.Row():
                c["seed"] = gr.Number(label="Seed", value=0, precision=0)
                c["random"] = gr.Checkbox(label="Random seed", value=True)
                c["used_seed"] = gr.Textbox(label="Used seed", interactive=False)
            with gr.Row():
                c["cfg"] = gr.Slider(1, 10, value=1, step=0.1, label="CFG scale")
                c["guidance"] = guidance_slider(state.generator.pipe)
            with gr.Row():
                c["run"] = gr.Button("Generate", variant="primary")
                c["stop"] = gr.Button("Stop")
            with gr.Accordion("LoRA", open=True):
                c["loras"], c["strengths"] = [], []
                for i in range(LORA_SLOTS):
                    with gr.Row():
                        c["loras"].append(gr.Dropdown(label=f"LoRA {i + 1}", choices=lora_choices(state), value=None,
                                                      scale=3))
                        c["strengths"].append(gr.Slider(-2, 2, value=1, step=0.05, label=f"LoRA {i + 1} strength",
                                                        scale=2))
                c["lora_upload"] = gr.File(label="Add a LoRA file (.safetensors)", file_types=[".safetensors"],
                                           height=90)
            with gr.Accordion("Image to image", open=False):
                c["input_image"] = gr.Image(label="Input image", type="pil")
                c["strength"] = gr.Slider(0.05, 1, value=0.7, step=0.05, label="Denoising strength")
        with gr.Column(scale=2):
            c["result"] = gr.Image(label="Result", type="filepath", elem_id="result", interactive=False,
                                   height=320)
            c["file"] = gr.File(label="PNG with parameters", interactive=False)
            c["gallery"] = gr.Gallery(label="This session's images", columns=4, height=240, elem_id="gallery",
                                      object_fit="contain")
            c["history"] = gr.State([])
    c["seed"].input(lambda: False, outputs=c["random"], queue=False)  # typing a seed means "use this seed"
    c["lora_upload"].upload(lambda f: upload_lora(state, f), inputs=c["lora_upload"],
                            outputs=[*c["loras"], c["lora_upload"]], queue=False)
    return c


def guidance_slider(pipe) -> gr.Slider:
    """Embedded guidance, starting at the loaded pipeline's own default (FLUX.1 3.5, FLUX.2 4.0); fixed, and
    saying why, for a DiT without a guidance embedder (it would do nothing)."""
    from ..generation import fill_defaults
    default = fill_defaults(type(pipe), {"embedded_guidance": None})["embedded_guidance"]
    fixed = {} if pipe.uses_embedded_guidance else {"interactive": False,
                                                    "info": "this model has no guidance embedder: use CFG scale"}
    return gr.Slider(0, 30, value=default, step=0.1, label="Embedded guidance", **fixed)


def lora_choices(state: AppState) -> list[str]:
    return list(state.sandbox.lora_files())


def refreshed_loras(state: AppState, count: int) -> list:
    """New choices for the LoRA lists (a trained checkpoint appears); the selections stay as they are."""
    choices = lora_choices(state)
    return [gr.update(choices=choices) for _ in range(count)]


def upload_lora(state: AppState, upload: str | None) -> list:
    try:
        added = add_lora(state.sandbox, upload) if upload else None
    except USER_ERRORS as e:
        raise message(e) from None
    if added:
        gr.Info(f"added {added.name}")
    return refreshed_loras(state, LORA_SLOTS) + [None]


def edit_tab(state: AppState) -> dict:
    c: dict = {}
    kinds = state.kinds
    if not kinds:
        gr.Markdown("The loaded models take no image conditions.")
    gr.Markdown("These conditions are used by **Generate** (Generate tab), with its prompt and settings.",
                visible=bool(kinds))
    with gr.Group(visible=bool({cond.KONTEXT, cond.REFERENCE} & kinds)):
        label = "Reference images (Kontext)" if cond.KONTEXT in kinds else "Reference images (FLUX.2 editing)"
        c["references"] = gr.File(label=label, file_count="multiple", file_types=["image"])
    with gr.Group(visible=cond.FILL in kinds):
        c["fill"] = gr.ImageEditor(label="Inpaint: image, paint the area to repaint", type="pil",
                                   brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
    choices = cond.annotators()
    for kind, label in ((cond.CONTROL, "Control image (Canny/Depth DiT)"), (cond.CONTROLNET, "ControlNet image")):
        with gr.Group(visible=kind in kinds):
            with gr.Row():
                image = gr.Image(label=label, type="pil")
                preview = gr.Image(label="Annotator preview", type="pil", interactive=False)
            annotator = gr.Dropdown(label="Annotator", choices=choices, value=choices[0])
            scale = gr.Slider(0, 2, value=1, step=0.05, label="ControlNet scale", visible=kind == cond.CONTROLNET)
        for trigger in (image.change, annotator.change):
            trigger(preview_annotator, inputs=[image, annotator], outputs=preview, concurrency_limit=None)
        c[kind] = (image, annotator, scale)
    with gr.Group(visible=cond.IPADAPTER in kinds):
        c["ip_image"] = gr.Image(label="IP-Adapter image", type="pil")
        c["ip_scale"] = gr.Slider(0, 2, value=1, step=0.05, label="IP-Adapter scale")
    return c


def preview_annotator(image, processor: str):
    try:
        return cond.annotate(image, processor)
    except USER_ERRORS as e:
        raise message(e) from None


def wire_generation(state: AppState, gen: dict, edit: dict) -> None:
    named = {k: gen[k] for k in ("prompt", "negative", "width", "height", "steps", "seed", "random", "cfg",
                                 "guidance", "input_image", "strength", "history")}
    named |= {f"lora{i}": d for i, d in enumerate(gen["loras"])} | {f"strength{i}": s for i, s in
                                                                     enumerate(gen["strengths"])}
    named |= {k: edit[k] for k in ("references", "fill", "ip_image", "ip_scale")}
    named |= {f"{kind}_{part}": c for kind in (cond.CONTROL, cond.CONTROLNET)
              for part, c in zip(("image", "annotator", "scale"), edit[kind])}
    outputs = [gen["result"], gen["file"], gen["used_seed"], gen["gallery"], gen["history"]]

    def run(data: dict, request: gr.Request, progress=gr.Progress()):
        values = {name: data[c] for name, c in named.items()}
        history = values["history"]
        try:
            req = make_request(state, values)
            result = state.generator.run(req, request.session_hash,
                                         lambda i, n: progress((i, n), desc="denoising", unit="steps"))
        except Cancelled as e:
            gr.Warning(f"Stopped: {e}")
            return [gr.update()] * 4 + [history]
        except USER_ERRORS as e:
            raise message(e) from None
        history = [*history, (str(result.path), result.caption)]
        return str(result.path), str(result.path), str(result.seed), history, history

    def stop(request: gr.Request) -> None:
        if not state.generator.stop(request.session_hash):
            gr.Info("nothing is being generated in this tab")

    gen["run"].click(run, inputs=set(named.values()), outputs=outputs, concurrency_limit=1,
                     concurrency_id="generate")
    gen["stop"].click(stop, queue=False)


def make_request(state: AppState, v: dict) -> Request:
    """The page's values (by name, see wire_generation) checked and turned into a Request."""
    for name in ("width", "height", "seed"):
        if v[name] is None:
            raise ValueError(f"{name.capitalize()}: enter a number")
    files = state.sandbox.lora_files()
    chosen = [(v[f"lora{i}"], float(v[f"strength{i}"])) for i in range(LORA_SLOTS) if v[f"lora{i}"]]
    missing = [name for name, _ in chosen if name not in files]
    if missing:
        raise FileNotFoundError(f"LoRA {missing[0]} is no longer in the UI's folders")
    references = [read_image(f, "reference image") for f in v["references"] or []]
    extra = cond.conditions(state.kinds, references, v["fill"], (v["control_image"], v["control_annotator"]),
                            (v["controlnet_image"], v["controlnet_annotator"], float(v["controlnet_scale"])),
                            (v["ip_image"], float(v["ip_scale"])))
    image = v["input_image"]
    return Request(prompt=v["prompt"], negative_prompt=v["negative"], height=int(v["height"]), width=int(v["width"]),
                   num_inference_steps=int(v["steps"]), seed=None if v["random"] else int(v["seed"]),
                   cfg_scale=float(v["cfg"]), embedded_guidance=float(v["guidance"]),
                   loras=[(state.sandbox.inside(files[name], "LoRA"), s) for name, s in chosen],
                   input_image=convert_image(image) if image is not None else None,
                   denoising_strength=float(v["strength"]) if image is not None else 1.0, conditions=extra)


def train_tab(state: AppState, lora_dropdowns: list) -> None:
    gr.Markdown("Trains a LoRA on the DiT with `diffsynth train` (a separate process). Give a folder with "
                "`metadata.csv` (columns `image`, `prompt`) inside the UI's folders, or upload images with captions."
                + (f" On flux-nano, **Draw the {NANO_EXAMPLE} example** makes the dataset of the README's recipe."
                   if state.nano else ""))
    with gr.Row():
        with gr.Column():
            folder = gr.Textbox(label="Image folder", placeholder="a folder with metadata.csv")
            uploads = gr.File(label="Or upload training images", file_count="multiple", file_types=["image"])
            captions = gr.Textbox(label="Captions", lines=3,
                                  placeholder="one line per uploaded image, or one line for all of them")
            example = gr.Button(f"Draw the {NANO_EXAMPLE} example", visible=state.nano)
            name = gr.Textbox(label="Run name", value="my-lora")
            with gr.Row():
                rank = gr.Number(label="LoRA rank", value=8, precision=0, minimum=1)
                steps = gr.Number(label="Training steps", value=150, precision=0, minimum=1)
                lr = gr.Number(label="Learning rate", value=2e-3, minimum=0)
                batch = gr.Number(label="Batch size", value=4, precision=0, minimum=1)
            with gr.Row():
                start = gr.Button("Train", variant="primary")
                halt = gr.Button("Stop training")
        with gr.Column():
            status = gr.Textbox(label="Training status", interactive=False, lines=3)
            plot = gr.LinePlot(label="Loss (mean of the last 20 steps)", x="step", y="loss", height=260)
            checkpoints = gr.Textbox(label="Checkpoints", interactive=False, lines=3)
    example.click(lambda: draw_example(state), outputs=folder, concurrency_limit=None)
    start.click(lambda *v: start_training(state, *v), inputs=[folder, uploads, captions, name, rank, steps, lr, batch],
                outputs=status, concurrency_limit=None)
    halt.click(lambda: stop_training(state), outputs=status, concurrency_limit=None)
    timer = gr.Timer(1.0)
    timer.tick(lambda: poll_training(state, len(lora_dropdowns)),
               outputs=[status, plot, checkpoints, *lora_dropdowns], concurrency_limit=None, show_progress="hidden")


def draw_example(state: AppState) -> str:
    """The flux-nano colour recipe's drawings (once; an existing example folder is reused, never rewritten)."""
    from ..nano.concept import concept_examples
    from ..nano.shapes import write_dataset
    folder = state.sandbox.output / "datasets" / f"{NANO_EXAMPLE}-example"
    if not (folder / "metadata.csv").is_file():
        write_dataset(folder, concept_examples(NANO_EXAMPLE, 8))
    gr.Info(f"8 drawings of {NANO_EXAMPLE} shapes in {folder}")
    return str(folder)


def start_training(state: AppState, folder, uploads, captions, name, rank, steps, lr, batch) -> str:
    try:
        with state.training_lock:
            if state.training is not None and state.training.running:
                raise RuntimeError("a training run is in progress: stop it or wait for it to finish")
            run_name = slug(name or "", "Run name")
            data = state.sandbox.inside(folder, "Image folder") if (folder or "").strip() else \
                write_upload_dataset(state.sandbox, run_name, uploads or [], captions or "")
            settings = TrainSettings(data=data, output=state.sandbox.output / "train" / run_name, rank=rank,
                                     steps=steps, learning_rate=lr, batch_size=batch, height=state.height,
                                     width=state.width)
            state.training = TrainingRun(settings, state.models)
    except USER_ERRORS as e:
        raise message(e) from None
    return f"started: {run_name} ({int(steps)} steps)"


def stop_training(state: AppState) -> str:
    if state.training is None or not state.training.running:
        return "no training is running"
    state.training.stop()
    return "stopped"


def poll_training(state: AppState, lora_lists: int) -> list:
    import pandas as pd
    run = state.training
    refresh = refreshed_loras(state, lora_lists)
    if run is None:
        return [gr.update(), gr.update(), gr.update(), *refresh]
    if run.running:
        done = run.losses[-1][0] if run.losses else 0
        text = f"{run.settings.output.name}: training, step {done} / {int(run.settings.steps)}"
    else:
        error = run.error()
        text = f"{run.settings.output.name}: failed: {error}" if error else f"{run.settings.output.name}: done"
    steps_done, losses = zip(*run.losses) if run.losses else ((), ())
    # typed columns: an empty object column would make the plot's axes categorical for good
    frame = pd.DataFrame({"step": pd.Series(steps_done, dtype="int64"), "loss": pd.Series(losses, dtype="float64")})
    files = "\n".join(str(Path(p).relative_to(state.sandbox.output)) for p in run.checkpoints())
    return [text, frame, files or "(none yet)", *refresh]
