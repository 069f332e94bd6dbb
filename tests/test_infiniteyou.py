"""InfiniteYou: the projector file, the face pipeline (tiny SCRFD-shaped ONNX detector, tiny facexlib-layout
ArcFace) and the pipeline with InfuseNet, all on tiny models in the release's file layout."""
import math
import sys

import numpy as np
import pytest
import torch

from diffsynth import ControlNetInput, FluxImagePipeline, ModelConfig
from diffsynth.loading.registry import detect
from diffsynth.models import face_id
from diffsynth.models.face_id import ARCFACE_TEMPLATE, align_face, similarity_transform
from diffsynth.testing.tiny_infiniteyou import (INFUSENET_FOLDER, PROJECTOR_FILE, build_tiny_infiniteyou,
                                                face_image)

from conftest import require

# the face pipeline: SCRFD through onnxruntime, alignment through OpenCV
FACE_EXTRA = pytest.mark.needs("onnxruntime", "cv2")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def iy_root(tmp_path_factory):
    require("onnx")  # the tiny detector is written as an ONNX graph
    return build_tiny_infiniteyou(tmp_path_factory.mktemp("iy") / "ByteDance" / "InfiniteYou")


@pytest.fixture(scope="module")
def iy_pipe(tiny_configs, iy_root):
    configs = tiny_configs() + [ModelConfig(path=str(iy_root / PROJECTOR_FILE)),
                                ModelConfig(path=sorted(str(p) for p in (iy_root / INFUSENET_FOLDER).glob("*.safetensors")))]
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)


def black(size=64):
    from PIL import Image
    return Image.new("RGB", (size, size))


def reference_projector(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The resampler written out from the file's tensors: per layer, queries attend over [x, queries]."""
    ln = lambda t, p: torch.nn.functional.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    latents = sd["latents"]
    x = x @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(depth):
        a = f"layers.{i}.0"
        xn, qn = ln(x, a + ".norm1"), ln(latents, a + ".norm2")
        q = qn @ sd[a + ".to_q.weight"].T
        k, v = (torch.cat([xn, qn], 1) @ sd[a + ".to_kv.weight"].T).chunk(2, -1)
        b, n, width = q.shape
        d = width // heads
        q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
        latents = latents + (w @ v).permute(0, 2, 1, 3).reshape(b, n, width) @ sd[a + ".to_out.weight"].T
        f = f"layers.{i}.1"
        h = torch.nn.functional.gelu(ln(latents, f + ".0") @ sd[f + ".1.weight"].T)
        latents = latents + h @ sd[f + ".3.weight"].T
    return ln(latents @ sd["proj_out.weight"].T + sd["proj_out.bias"], "norm_out")


def test_projector_file_loads_and_matches(iy_root, iy_pipe):
    raw = torch.load(iy_root / PROJECTOR_FILE, weights_only=True)
    assert list(raw) == ["image_proj"] and "layers.0.0.to_kv.weight" in raw["image_proj"]
    (det,) = detect(str(iy_root / PROJECTOR_FILE))
    assert det.family == "infiniteyou-projector"
    proj = iy_pipe.image_proj_model
    assert {k for k, _ in proj.state_dict().items()} == set(raw["image_proj"])  # the file's own names
    x = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = proj(x)
    assert ours.shape == (1, 8, 32)
    torch.testing.assert_close(ours, reference_projector(raw["image_proj"], x, heads=2), rtol=1e-5, atol=1e-5)


def test_infusenet_loads_as_controlnet(iy_pipe):
    (net,) = iy_pipe.controlnet
    assert (net.config.num_double_blocks, net.config.num_single_blocks, net.is_union) == (2, 2, False)


@pytest.mark.needs("cv2")
def test_similarity_transform_and_alignment():
    angle, scale, shift = math.radians(25), 1.7, np.array([30.0, 12.0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    # keypoints = the template moved by a known similarity; aligning must invert it exactly
    kps = (ARCFACE_TEMPLATE @ rot.T) * scale + shift
    m = similarity_transform(kps, ARCFACE_TEMPLATE)
    inv = rot.T / scale
    np.testing.assert_allclose(m[:, :2], inv, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], -inv @ shift, atol=1e-4)  # the template is float32
    # the warp samples the source through the inverse map: on a ramp image (red = x, green = y) every crop pixel
    # (i, j) shows the coordinates of kps-space point scale * rot @ (i, j) + shift (bilinear: exact on a ramp)
    ys, xs = np.mgrid[:256, :256]
    image = np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8)
    crop = align_face(image, kps.astype(np.float32))
    assert crop.shape == (112, 112, 3)
    j, i = np.mgrid[:112, :112]
    src = np.stack([i, j], -1) @ (scale * rot).T + shift
    inside = (src >= 0).all(-1) & (src <= 255).all(-1)
    assert inside.mean() > 0.9
    assert np.abs(crop[..., :2][inside].astype(float) - src[inside]).max() <= 1.0


@FACE_EXTRA
def test_face_embedding(iy_root):
    folder = face_id.face_folder(str(iy_root / PROJECTOR_FILE))
    faces = face_id.FaceEmbedder(folder, torch.device("cpu"), torch.float32)
    face = faces.detector.largest_face(np.asarray(face_image()))
    assert 64 <= face.box[0] <= 160 and face.score > 0.9  # on the white square (96..160)
    e = faces(face_image())
    assert e.shape == (512,) and torch.isclose(e.norm(), torch.tensor(1.0))
    other = faces(face_image(box=(40, 60, 120, 140)))
    assert not torch.allclose(e, other)
    with pytest.raises(ValueError, match="no face found"):
        faces(black(256))


@FACE_EXTRA
def test_detector_with_fixed_input_size(tmp_path):
    """A detector exported at a fixed size runs at that size for every requested size; a non-square one
    letterboxes by its own aspect ratio."""
    from diffsynth.testing.tiny_infiniteyou import write_face_models
    folder = write_face_models(tmp_path, detector_size=(320, 256))
    detector = face_id.FaceDetector(str(folder / face_id.DETECTOR_FILE), ["CPUExecutionProvider"])
    assert detector.fixed_size == (320, 256)
    rgb = np.asarray(face_image(256, (96, 96, 160, 160)))
    boxes = [[f.box.tolist() for f in detector.detect(rgb, size)] for size in (640, 160)]
    assert boxes[0] == boxes[1] and boxes[0]


@FACE_EXTRA
def test_missing_face_models_and_extra(tmp_path, iy_root, monkeypatch):
    with pytest.raises(FileNotFoundError, match="scrfd_10g_bnkps.onnx.*antelopev2"):
        face_id.FaceEmbedder(tmp_path / "antelopev2", torch.device("cpu"), torch.float32)
    repo = build_tiny_infiniteyou(tmp_path / "no_arcface")
    (repo / "supports" / "facexlib" / face_id.RECOGNITION_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="recognition_arcface_ir_se50.pth"):
        face_id.FaceEmbedder(face_id.face_folder(str(repo / PROJECTOR_FILE)), torch.device("cpu"), torch.float32)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"diffsynth-flux\[infiniteyou\]"):
        face_id.FaceEmbedder(face_id.face_folder(str(iy_root / PROJECTOR_FILE)), torch.device("cpu"), torch.float32)


@FACE_EXTRA
def test_pipeline_identity_changes_image(iy_pipe):
    args = dict(prompt="a man", height=64, width=64, num_inference_steps=2, seed=1, output_type="pt",
                controlnet_inputs=[ControlNetInput(image=black(), processor_id="None")])
    plain = iy_pipe(**args)
    with_id = iy_pipe(**args, infinityou_id_image=face_image(), infinityou_guidance=1.0)
    other_guidance = iy_pipe(**args, infinityou_id_image=face_image(), infinityou_guidance=3.0)
    assert (with_id - plain).abs().max() > 1e-4
    assert (with_id - other_guidance).abs().max() > 1e-4
    # CFG: the identity context reaches both branches; batched and unbatched CFG agree
    cfg = dict(args, cfg_scale=2.0, infinityou_id_image=face_image())
    torch.testing.assert_close(iy_pipe(**cfg), iy_pipe(**cfg, batch_cfg=False), rtol=1e-4, atol=1e-4)


@FACE_EXTRA
def test_identity_tokens_reach_the_controlnet(iy_root, iy_pipe, monkeypatch):
    """InfuseNet's call inside the pipeline: text = projector(ArcFace embedding), zero text positions,
    guidance = infinityou_guidance; its residuals equal diffusers' FluxControlNetModel on the same inputs."""
    from diffusers import FluxControlNetModel
    calls = []
    net = iy_pipe.controlnet[0]
    original = type(net).forward

    def spy(self, *args, **kw):
        out = original(self, *args, **kw)
        calls.append((args, kw, out))
        return out
    monkeypatch.setattr(type(net), "forward", spy)
    iy_pipe(prompt="a man", height=64, width=64, num_inference_steps=1, seed=1, output_type="latent",
            controlnet_inputs=[ControlNetInput(image=black(), processor_id="None")],
            infinityou_id_image=face_image(), infinityou_guidance=2.5)
    (img, img_ids, txt, txt_ids, timestep, pooled, guidance), kw, out = calls[0]
    with torch.no_grad():
        tokens = iy_pipe.image_proj_model(face_id.FaceEmbedder(face_id.face_folder(str(iy_root / PROJECTOR_FILE)),
                                                               torch.device("cpu"), torch.float32)(face_image())[None, None])
    torch.testing.assert_close(txt, tokens)
    assert txt.shape == (1, 8, 32) and txt_ids.shape == (1, 8, 3) and not txt_ids.any() and guidance.tolist() == [2.5]
    ref = FluxControlNetModel.from_pretrained(str(iy_root / INFUSENET_FOLDER)).eval()
    with torch.no_grad():
        double, single = ref(hidden_states=img, controlnet_cond=kw["cond"], encoder_hidden_states=txt,
                             pooled_projections=pooled, timestep=timestep, img_ids=img_ids[0], txt_ids=txt_ids[0],
                             guidance=guidance, return_dict=False)
    for a, b in zip(out.double + out.single, [*double, *single], strict=True):
        assert (a - b).abs().max() / b.abs().max() < 1e-5


@FACE_EXTRA
def test_identity_errors(tiny_pipe, iy_pipe):
    with pytest.raises(RuntimeError, match="image_proj_model.bin"):
        tiny_pipe(prompt="a", height=64, width=64, num_inference_steps=1, infinityou_id_image=face_image())
    with pytest.raises(ValueError, match="controlnet_inputs"):
        iy_pipe(prompt="a", height=64, width=64, num_inference_steps=1, infinityou_id_image=face_image())
    control = [ControlNetInput(image=black(), processor_id="None")]
    with pytest.raises(ValueError, match="no face found"):
        iy_pipe(prompt="a", height=64, width=64, num_inference_steps=1, infinityou_id_image=black(),
                controlnet_inputs=control)
    with pytest.raises(TypeError, match="infinityou_id_image must be a PIL image"):
        iy_pipe(prompt="a", height=64, width=64, num_inference_steps=1, infinityou_id_image="man.jpg",
                controlnet_inputs=control)
    with pytest.raises(TypeError, match="infinityou_guidance must be a number"):
        iy_pipe(prompt="a", height=64, width=64, num_inference_steps=1, infinityou_id_image=face_image(),
                infinityou_guidance="strong", controlnet_inputs=control)


def test_arcface_config_of_ir_se50_layout():
    """facexlib's IR-SE50 (64/128/256/512 wide, 3/4/14/3 units, the first of each stage of stride 2) is read
    back from its key shapes alone."""
    widths, counts = (64, 128, 256, 512), (3, 4, 14, 3)
    units, previous = [], 64
    for width, count in zip(widths, counts):
        units += [(previous, width, 2)] + [(width, width, 1)] * (count - 1)
        previous = width
    config = face_id.ArcFaceConfig(tuple(units))
    with torch.device("meta"):
        model = face_id.ArcFaceIRSE(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert "body.0.res_layer.5.fc1.weight" in shapes and "body.3.shortcut_layer.0.weight" in shapes
    assert face_id.infer_arcface_config(shapes) == config
    assert sum(v.numel() for v in model.parameters()) == 43_797_696
