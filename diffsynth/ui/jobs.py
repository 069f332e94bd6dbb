"""Generation jobs of the web UI: one at a time per pipeline, progress per denoising step, a Stop that is
checked between steps, LoRAs applied for one image only, PNGs written with the CLI's metadata."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..generation import png_metadata
from .files import Sandbox

Report = Callable[[int, int], None]  # (steps done, total steps)


class Cancelled(Exception):
    """Stop was pressed: the generation ended between two steps."""


class StepHook:
    """A `progress_bar_cmd` for the pipeline: reports each step and raises Cancelled between steps once
    `cancel` is set."""

    def __init__(self, report: Report, cancel: threading.Event):
        self.report, self.cancel = report, cancel

    def __call__(self, steps: Iterable) -> Iterator:
        steps = list(steps)
        for i, step in enumerate(steps):
            if self.cancel.is_set():
                raise Cancelled(f"stopped after {i} of {len(steps)} steps")
            self.report(i, len(steps))
            yield step
        self.report(len(steps), len(steps))


@dataclass
class Request:
    """One image, as the Generate and Edit tabs describe it."""
    prompt: str
    negative_prompt: str = ""
    height: int = 64
    width: int = 64
    num_inference_steps: int = 20
    seed: int | None = None  # None: random (the used seed is reported)
    cfg_scale: float = 1.0
    embedded_guidance: float = 3.5
    loras: list[tuple[Path, float]] = field(default_factory=list)
    input_image: Image.Image | None = None
    denoising_strength: float = 1.0
    conditions: dict = field(default_factory=dict)  # variant inputs (kontext_images, flux_fill_mask, ...)

    def params(self) -> dict:
        """The pipeline's arguments (without the images and LoRAs)."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "height": self.height,
                "width": self.width, "num_inference_steps": self.num_inference_steps, "seed": self.seed,
                "cfg_scale": self.cfg_scale, "embedded_guidance": self.embedded_guidance,
                "denoising_strength": self.denoising_strength}


@dataclass
class Result:
    path: Path
    image: Image.Image
    seed: int
    caption: str  # the parameters, for the gallery


class Generator:
    """Runs requests on one pipeline, one at a time (a second caller waits for the lock), one cancel flag
    per browser session so that Stop in one tab never stops another tab's image."""

    def __init__(self, pipe, models: list[str], sandbox: Sandbox, check_prompt: Callable[[str], None] | None = None):
        self.pipe, self.models, self.sandbox, self.check_prompt = pipe, models, sandbox, check_prompt
        self.lock = threading.Lock()
        self.cancels: dict[str, threading.Event] = {}

    def stop(self, session: str) -> bool:
        """Ask the session's running generation to stop; False when it runs none."""
        event = self.cancels.get(session)
        if event is None:
            return False
        event.set()
        return True

    def run(self, request: Request, session: str, report: Report) -> Result:
        if self.check_prompt is not None:
            self.check_prompt(request.prompt)
        cancel = threading.Event()
        self.cancels[session] = cancel
        try:
            with self.lock:
                if cancel.is_set():  # stopped while waiting for another tab's image
                    raise Cancelled("stopped before it started")
                image = self._generate(request, StepHook(report, cancel))
                seed = self.pipe.last_seed
        finally:
            self.cancels.pop(session, None)
        return self._save(request, image, seed)

    def _generate(self, request: Request, hook: StepHook) -> Image.Image:
        try:
            for path, alpha in request.loras:
                # hot-loaded: cleared after this image, the base weights stay untouched
                self.pipe.load_lora(self.pipe.dit, str(path), alpha=alpha, hotload=True)
            params = request.params()
            if not self.pipe.uses_embedded_guidance:  # (FLUX.2 [klein] would warn that it does nothing)
                del params["embedded_guidance"]
            return self.pipe(**params, input_image=request.input_image, progress_bar_cmd=hook, **request.conditions)
        finally:
            if request.loras:
                self.pipe.clear_lora()

    def _save(self, request: Request, image: Image.Image, seed: int) -> Result:
        from ..ops.files import save_image
        params = {**request.params(), "input_image": "uploaded" if request.input_image is not None else None,
                  "loras": [(path.name, alpha) for path, alpha in request.loras],
                  "conditions": sorted(request.conditions)}
        path = self.sandbox.new_image_path(seed)
        text = png_metadata(params, seed, image.size, self.models)
        save_image(image, path, text, overwrite=False)
        return Result(path, image, seed, text["parameters"])


def grammar_check(vocabulary: Iterable[str]) -> Callable[[str], None]:
    """A prompt check for a model that knows only these words (flux-nano): a ValueError lists the others."""
    known = set(vocabulary)

    def check(prompt: str) -> None:
        unknown = sorted({w for w in prompt.lower().split() if w not in known})
        if unknown:
            raise ValueError(f"flux-nano does not know the word(s) {', '.join(unknown)}; it draws prompts such as "
                             "\"a red circle on the left\" (colours, circle/square/triangle, "
                             "left/right/top/bottom/center)")
    return check
