"""The web UI (`diffsynth ui`): its model-side pieces directly, then the page itself in a real browser
(Playwright driving Debian's Chromium) against `diffsynth ui` started as a subprocess on flux-nano."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.nano import SHIPPED
from diffsynth.nano.model import load_pipeline, model_files
from diffsynth.nano.shapes import vocabulary
from diffsynth.ops.files import save_safetensors
from diffsynth.testing.tiny_controlnet import build_tiny_controlnet
from diffsynth.testing.tiny_image import VARIANTS, build_tiny_variant
from diffsynth.ui import conditions as cond
from diffsynth.ui.app import guidance_slider
from diffsynth.ui.files import OutsideError, Sandbox, add_lora, write_upload_dataset
from diffsynth.ui.jobs import Cancelled, Generator, Request, grammar_check
from diffsynth.ui.training import PROGRESS, TrainSettings, train_argv


@pytest.fixture(scope="module")
def nano_pipe():
    return load_pipeline(SHIPPED)


@pytest.fixture
def sandbox(tmp_path):
    (tmp_path / "shared").mkdir()
    return Sandbox(tmp_path / "out", [tmp_path / "shared"])


# -- folders and uploads -------------------------------------------------------------------------

def test_sandbox_refuses_paths_outside_its_folders(sandbox, tmp_path):
    (tmp_path / "shared" / "data").mkdir()
    assert sandbox.inside(tmp_path / "shared" / "data", "Image folder") == (tmp_path / "shared" / "data").resolve()
    assert sandbox.inside("datasets", "Image folder") == sandbox.output / "datasets"  # relative: in the output
    (sandbox.output / "escape").symlink_to("/etc")
    for path in ("/etc/passwd", "../..", str(tmp_path), "escape/passwd", str(sandbox.output) + "-other", " "):
        with pytest.raises(OutsideError):
            sandbox.inside(path, "Image folder")


def test_lora_uploads_must_be_safetensors_and_never_replace_a_file(sandbox, tmp_path):
    good = tmp_path / "my lora.safetensors"
    save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, good)
    pickled = tmp_path / "evil.bin"
    torch.save({"x": torch.zeros(1)}, pickled)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="only .safetensors"):
        add_lora(sandbox, str(pickled))
    with pytest.raises(ValueError):
        add_lora(sandbox, str(damaged))
    added = add_lora(sandbox, str(good))
    assert added == sandbox.output / "loras" / "my-lora.safetensors" and added.read_bytes() == good.read_bytes()
    with pytest.raises(FileExistsError):
        add_lora(sandbox, str(good))
    assert list(sandbox.lora_files()) == ["loras/my-lora.safetensors"]


def test_uploaded_training_images_become_a_dataset(sandbox, tmp_path):
    uploads = []
    for i, colour in enumerate(("red", "blue")):
        uploads.append(str(tmp_path / f"u{i}.jpg"))
        Image.new("RGB", (32, 32), colour).save(uploads[-1])
    with pytest.raises(ValueError, match="one line per image"):
        write_upload_dataset(sandbox, "set", uploads, "a\nb\nc")
    folder = write_upload_dataset(sandbox, "my set!", uploads, "a purple square on the left")
    assert folder == sandbox.output / "datasets" / "my-set"
    assert (folder / "metadata.csv").read_text().splitlines() == [
        "image,prompt", "images/00000.png,a purple square on the left", "images/00001.png,a purple square on the left"]
    with pytest.raises(FileExistsError):
        write_upload_dataset(sandbox, "my set", uploads, "x")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        write_upload_dataset(sandbox, "bad", [str(tmp_path / "bad.png")], "x")


# -- generation jobs ----------------------------------------------------------------------------

def test_generation_reports_every_step_and_writes_png_metadata(nano_pipe, sandbox):
    steps = []
    gen = Generator(nano_pipe, model_files(SHIPPED), sandbox, grammar_check(vocabulary()))
    result = gen.run(Request("a red circle on the left", seed=1, num_inference_steps=4), "s", lambda i, n: steps.append((i, n)))
    assert steps == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.seed == 1 and result.path.parent == sandbox.output / "images"
    with Image.open(result.path) as im:
        assert "Seed: 1" in im.text["parameters"] and json.loads(im.text["diffsynth"])["num_inference_steps"] == 4


def test_guidance_slider_starts_at_the_pipelines_default(nano_pipe):
    slider = guidance_slider(nano_pipe)  # FLUX.1 (FLUX.2 [klein]: test_flux2_reference_images_are_its_edit_images)
    assert slider.value == 3.5 and slider.interactive is not False


def test_stop_ends_the_generation_between_steps(nano_pipe, sandbox):
    gen = Generator(nano_pipe, model_files(SHIPPED), sandbox)
    seen = []

    def report(i, n):
        seen.append(i)
        if i == 2:
            assert gen.stop("tab-1") and not gen.stop("tab-2")  # only this tab's image stops
    with pytest.raises(Cancelled, match="after 3 of 20 steps"):
        gen.run(Request("a red circle on the left", seed=0, num_inference_steps=20), "tab-1", report)
    assert seen == [0, 1, 2] and not list((sandbox.output / "images").iterdir())
    assert not gen.stop("tab-1")  # nothing runs any more


def test_one_generation_at_a_time(nano_pipe, sandbox):
    gen = Generator(nano_pipe, model_files(SHIPPED), sandbox)
    running, overlap = [], []

    def report(i, n):
        running.append(threading.get_ident())
        overlap.append(gen.lock.locked())
    threads = [threading.Thread(target=gen.run, args=(Request("a blue square on the top", seed=s, num_inference_steps=3),
                                                      f"tab-{s}", report)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(overlap) and len(list((sandbox.output / "images").iterdir())) == 2
    first = running[0]
    assert running[:4] == [first] * 4  # the second tab's steps begin after the first tab's image


def test_flux_nano_prompts_outside_its_grammar_are_refused():
    check = grammar_check(vocabulary())
    check("a purple triangle in the center")
    with pytest.raises(ValueError, match="does not know the word.*cat"):
        check("a cat on the left")


def test_loras_apply_to_one_image_only(nano_pipe, sandbox, tmp_path):
    lora = tmp_path / "lora.safetensors"
    dit = nano_pipe.dit
    name = next(n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features == 128)
    layer = dict(dit.named_modules())[name]
    save_safetensors({f"{name}.lora_A.weight": torch.ones(2, layer.in_features),
                      f"{name}.lora_B.weight": torch.ones(layer.out_features, 2)}, lora)
    gen = Generator(nano_pipe, model_files(SHIPPED), sandbox)
    args = dict(prompt="a red circle on the left", seed=1, num_inference_steps=3)
    plain = np.asarray(gen.run(Request(**args), "s", lambda i, n: None).image, dtype=int)
    with_lora = gen.run(Request(**args, loras=[(lora, 0.05)]), "s", lambda i, n: None)
    again = np.asarray(gen.run(Request(**args), "s", lambda i, n: None).image, dtype=int)
    assert np.abs(np.asarray(with_lora.image, dtype=int) - plain).max() > 10 and (again == plain).all()
    with Image.open(with_lora.path) as im:
        assert json.loads(im.text["diffsynth"])["loras"] == [["lora.safetensors", 0.05]]


# -- the Edit tab's model side ------------------------------------------------------------------

def test_edit_tab_offers_only_what_the_models_can_use(tiny_root, tmp_path):
    encoders = [ModelConfig(path=str(tiny_root / p)) for p in
                ("text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")]
    fill = build_tiny_variant(tmp_path / "fill", "fill") / VARIANTS["fill"][0]
    net = next(build_tiny_controlnet(tmp_path / "cn", "plain").glob("*.safetensors"))
    base = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(tiny_root / "flux1-dev.safetensors")), *encoders, ModelConfig(path=str(net))])
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(fill)), *encoders])
    assert cond.available(base) == {cond.KONTEXT, cond.CONTROLNET} and cond.available(pipe) == {cond.FILL}
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    layer = Image.new("RGBA", (64, 64))
    ImageDraw.Draw(layer).rectangle((0, 0, 31, 63), fill=(255, 255, 255, 255))  # painted: the left half
    extra = cond.conditions({cond.FILL}, [], {"background": picture, "layers": [layer]}, (None, "canny"),
                            (picture, "canny", 1.0), (picture, 1.0))
    assert sorted(extra) == ["flux_fill_image", "flux_fill_mask"]  # the ControlNet/IP images: not for this model
    mask = np.asarray(extra["flux_fill_mask"])
    assert mask[:, :32].min() == 255 and mask[:, 32:].max() == 0
    pipe("a cat", height=64, width=64, num_inference_steps=2, progress_bar_cmd=lambda x: x, **extra)
    with pytest.raises(ValueError, match="mask is empty"):
        cond.conditions({cond.FILL}, [], {"background": picture, "layers": []}, (None, ""), (None, "", 1.0),
                        (None, 1.0))


def test_flux2_reference_images_are_its_edit_images(tmp_path, sandbox):
    """With FLUX.2 loaded the Edit tab offers its reference images only, and they reach the call as `edit_image`:
    the saved image is the pipeline's own edit of that reference."""
    from diffsynth import Flux2ImagePipeline
    from diffsynth.testing.tiny_flux2 import build_tiny_flux2
    root = build_tiny_flux2(tmp_path / "FLUX.2-klein-4B")
    files = [str(root / "text_encoder"), str(root / "transformer"), str(root / "vae" / "diffusion_pytorch_model.safetensors")]
    pipe = Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                              model_configs=[ModelConfig(path=f) for f in files])
    assert cond.available(pipe) == {cond.REFERENCE}
    slider = guidance_slider(pipe)  # klein has no guidance embedder: the slider is fixed and says why
    assert slider.value == 4.0 and slider.interactive is False and "no guidance embedder" in slider.info
    reference = Image.new("RGB", (64, 48), (200, 30, 30))
    extra = cond.conditions({cond.REFERENCE}, [reference], None, (None, ""), (reference, "canny", 1.0), (None, 1.0))
    assert list(extra) == ["edit_image"]
    args = dict(prompt="make it blue", seed=3, num_inference_steps=2, height=48, width=64)
    result = Generator(pipe, files, sandbox).run(Request(**args, conditions=extra), "s", lambda i, n: None)
    expected = pipe(**args, edit_image=[reference], progress_bar_cmd=lambda x: x)
    plain = pipe(**args, progress_bar_cmd=lambda x: x)
    saved = np.asarray(Image.open(result.path).convert("RGB"), dtype=int)
    assert (saved == np.asarray(expected, dtype=int)).all() and (saved != np.asarray(plain, dtype=int)).any()

    # the page: `diffsynth ui --model-dir` on the klein folder builds, and an uploaded reference becomes edit_image
    from diffsynth.cli import build_parser
    from diffsynth.ui.app import build_app, make_request
    from diffsynth.ui.launch import load_state
    state = load_state(build_parser().parse_args(["ui", "--model-dir", str(root), "--output", str(tmp_path / "ui"),
                                                  "--device", "cpu", "--dtype", "fp32"]))
    assert state.kinds == {cond.REFERENCE} and build_app(state) is not None
    reference.save(tmp_path / "upload.png")
    page = dict(prompt="make it blue", negative="", width=64, height=48, steps=2, seed=3, random=False, cfg=1.0,
                guidance=4.0, input_image=None, strength=1.0, references=[str(tmp_path / "upload.png")], fill=None,
                ip_image=None, ip_scale=1.0, control_image=None, control_annotator="canny", controlnet_image=None,
                controlnet_annotator="canny", controlnet_scale=1.0, lora0=None, strength0=1.0, lora1=None, strength1=1.0)
    request = make_request(state, page)
    assert list(request.conditions) == ["edit_image"] and request.conditions["edit_image"][0].size == (64, 48)


@pytest.mark.needs("cv2")  # canny
def test_annotator_preview_is_the_condition_image():
    picture = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(picture).rectangle((16, 16, 47, 47), fill=(255, 255, 255))
    edges = np.asarray(cond.annotate(picture, "canny"))
    assert "canny" in cond.annotators() and edges[12:20, 30].max() == 255 and edges[24:40, 24:40].max() == 0


# -- training -----------------------------------------------------------------------------------

def test_training_settings_and_progress_lines(tmp_path):
    line = "train:  40%|####      | 4/10 [00:01<00:02,  1.2it/s, loss=0.1234, lr=2.00e-03]"
    assert PROGRESS.search(line).groups() == ("4", "10", "0.1234")
    with pytest.raises(ValueError, match="no metadata.csv"):
        TrainSettings(tmp_path, tmp_path / "run").check()
    (tmp_path / "metadata.csv").write_text("image,prompt\n")
    with pytest.raises(ValueError, match="rank must be a positive whole number"):
        TrainSettings(tmp_path, tmp_path / "run", rank=0).check()
    argv = train_argv(TrainSettings(tmp_path, tmp_path / "run", steps=7), model_files(SHIPPED))
    assert argv[argv.index("--max_steps") + 1] == "7" and json.loads(argv[argv.index("--model_paths") + 1]) == \
        model_files(SHIPPED)


# -- the page, in a real browser ----------------------------------------------------------------

CHROMIUM = os.environ.get("DIFFSYNTH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def browser_test(fn):
    """A test of the page in a real browser: needs gradio, playwright and a Chromium."""
    no_chromium = pytest.mark.skipif(not CHROMIUM, reason="browser tests need chromium (apt-get install chromium, "
                                     "or DIFFSYNTH_CHROMIUM=/path/to/chrome)")
    return pytest.mark.needs("gradio", "playwright")(no_chromium(fn))


STARTUP_S = 300  # importing torch and gradio on a busy 2-core machine took up to 165 s
WAIT_MS = 240_000  # a generation or a 4-step training run, however busy the machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`diffsynth ui` on flux-nano, on a free loopback port: (url, output folder)."""
    root = tmp_path_factory.mktemp("ui")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffsynth.cli", "ui", "--port", str(port), "--output",
                             str(root / "out"), "--steps", "12"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    started, lines = time.time(), []
    while time.time() - started < STARTUP_S:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("diffsynth ui: ") or not line and proc.poll() is not None:
            break
    if proc.poll() is not None:
        pytest.fail("diffsynth ui did not start:\n" + "".join(lines))
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    yield f"http://127.0.0.1:{port}/", root / "out"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server[0])
    yield page
    page.close()


def result_image(page) -> Image.Image:
    data = page.request.get(page.locator("#result img").get_attribute("src")).body()
    return Image.open(io.BytesIO(data))


def generate(page, prompt: str, seed: int) -> Image.Image:
    from playwright.sync_api import expect
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Seed", exact=True).fill(str(seed))  # typing a seed unticks "Random seed"
    before = page.locator("#result img").get_attribute("src") if page.locator("#result img").count() else None
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_label("Used seed")).to_have_value(str(seed), timeout=WAIT_MS)
    expect(page.locator("#result img")).not_to_have_attribute("src", before or "", timeout=10_000)
    return result_image(page)


@browser_test
@pytest.mark.slow  # a real browser against a started server: make test-slow (CI runs it)
def test_browser_generates_what_the_prompt_says(page):
    image = generate(page, "a red circle on the left", seed=1)
    rgb = np.asarray(image.convert("RGB"), dtype=int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    half = rgb.shape[1] // 2
    assert red[:, :half].sum() > 50 and red[:, half:].sum() < red[:, :half].sum() / 10
    assert "Seed: 1" in image.text["parameters"]  # the PNG the page serves carries the metadata
    assert page.locator("#gallery img").count() >= 1


@browser_test
@pytest.mark.slow  # a real browser against a started server: make test-slow (CI runs it)
def test_browser_shows_errors_as_messages(page):
    page.get_by_label("Prompt", exact=True).fill("a cat on a sofa")
    page.get_by_role("button", name="Generate").click()
    from playwright.sync_api import expect
    expect(page.get_by_text(re.compile("does not know the word"))).to_be_visible(timeout=20_000)
    page.get_by_label("Width", exact=True).fill("0")
    page.get_by_label("Prompt", exact=True).fill("a red circle on the left")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text(re.compile("width must be a positive integer"))).to_be_visible(timeout=20_000)
    assert "Traceback" not in page.content()


@browser_test
@pytest.mark.slow  # a real browser against a started server: make test-slow (CI runs it)
def test_browser_stop_stops(page, server):
    from playwright.sync_api import expect
    page.get_by_label("number input for Steps").fill("100")
    for side in ("Width", "Height"):  # 1024 image tokens: steps slow enough to watch
        page.get_by_label(side, exact=True).fill("512")
    page.get_by_label("Prompt", exact=True).fill("a red circle on the left")
    images = len(list((server[1] / "images").iterdir()))
    page.get_by_role("button", name="Generate").click()
    progress = page.locator("#result").get_by_text(re.compile(r"\d+/100"))
    expect(progress).to_be_visible(timeout=20_000)
    first = int(re.search(r"(\d+)/100", progress.inner_text()).group(1))
    expect(progress).not_to_contain_text(f"{first}/100", timeout=20_000)  # the bar moves with the steps
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_text(re.compile("Stopped: stopped after"))).to_be_visible(timeout=20_000)
    assert len(list((server[1] / "images").iterdir())) == images  # no image was written


@browser_test
@pytest.mark.slow  # a real browser against a started server: make test-slow (CI runs it)
def test_browser_file_access_is_confined(server):
    import urllib.error
    import urllib.request
    url = server[0]
    for target in ("/etc/passwd", str(Path(__file__).resolve()), str(server[1].parent)):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}gradio_api/file={target}", timeout=10)


@browser_test
@pytest.mark.slow  # a real browser against a started server: make test-slow (CI runs it)
def test_browser_trains_a_lora_and_uses_it(page, server):
    from playwright.sync_api import expect
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Draw the purple example").click()
    expect(page.get_by_label("Image folder")).to_have_value(re.compile("purple-example"), timeout=20_000)
    page.get_by_label("Training steps").fill("4")
    page.get_by_label("Batch size").fill("2")
    page.get_by_label("Run name").fill("purple")
    page.get_by_role("button", name="Train", exact=True).click()
    status = page.get_by_label("Training status")
    expect(status).to_have_value(re.compile("purple: (done|failed)"), timeout=WAIT_MS)
    assert status.input_value() == "purple: done"
    expect(page.get_by_label("Checkpoints")).to_have_value(re.compile("train/purple/step-4.safetensors"))
    page.get_by_role("tab", name="Generate").click()
    page.get_by_label("LoRA 1", exact=True).click()
    page.get_by_role("option", name="train/purple/step-4.safetensors").click()
    image = generate(page, "a purple circle on the left", seed=1)
    assert json.loads(image.text["diffsynth"])["loras"] == [["step-4.safetensors", 1.0]]


def test_ui_command_checks_its_options_before_loading(tmp_path, capsys, monkeypatch):
    from diffsynth.cli import build_parser, main
    for name in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED"):  # `diffsynth ui` sets them: restored after
        monkeypatch.setenv(name, "")
    args = build_parser().parse_args(["ui"])
    assert (args.port, args.listen, args.model, args.model_dir, args.folder) == (7860, False, None, None, [])
    assert main(["ui", "--folder", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 1
    assert "--folder" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["ui", "--port", "70000", "--output", str(tmp_path / "out")]) == 1
    assert "--port must be in 1..65535" in capsys.readouterr().err


@pytest.mark.needs("gradio")
def test_ui_command_loads_flux_nano_without_a_browser(tmp_path):
    """What `diffsynth ui` does before serving (the browser tests start it too, in make test-slow): parse,
    load flux-nano through the CLI's pipeline builder, and describe the page."""
    from diffsynth.cli import build_parser
    from diffsynth.ui.launch import load_state
    state = load_state(build_parser().parse_args(["ui", "--output", str(tmp_path / "out"), "--device", "cpu"]))
    assert state.nano and state.steps == 20 and (state.height, state.width) == (64, 64)
    assert state.generator is not None


@browser_test
@pytest.mark.slow  # a real browser against a started server: make test-slow (CI runs it)
def test_browser_second_tab_waits_for_the_first(browser, server):
    from playwright.sync_api import expect
    first, second = (browser.new_page(viewport={"width": 1280, "height": 900}) for _ in range(2))
    for page in (first, second):
        page.goto(server[0])
        page.get_by_label("Prompt", exact=True).fill("a green square on the right")
    first.get_by_label("number input for Steps").fill("100")
    for side in ("Width", "Height"):
        first.get_by_label(side, exact=True).fill("512")
    first.get_by_role("button", name="Generate").click()
    expect(first.locator("#result").get_by_text(re.compile(r"\d+/100"))).to_be_visible(timeout=20_000)
    second.get_by_role("button", name="Generate").click()
    expect(second.locator("#result").get_by_text(re.compile(r"queue: 1/1"))).to_be_visible(timeout=20_000)
    first.get_by_role("button", name="Stop").click()  # the first tab's Stop does not wait in the queue
    expect(second.get_by_label("Used seed")).to_have_value(re.compile(r"\d+"), timeout=WAIT_MS)
    expect(first.get_by_label("Used seed")).to_have_value("")
    first.close()
    second.close()
