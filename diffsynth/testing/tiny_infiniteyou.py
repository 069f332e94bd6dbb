"""A tiny random ByteDance/InfiniteYou folder in the release's layout:

    infu_flux_v1.0/aes_stage2/image_proj_model.bin            {"image_proj": projector state dict} (torch.save)
    infu_flux_v1.0/aes_stage2/InfuseNetModel/                 diffusers FluxControlNetModel, 2 shards + index
    supports/insightface/models/antelopev2/scrfd_10g_bnkps.onnx   a SCRFD-shaped detector (9 outputs)
    supports/facexlib/recognition_arcface_ir_se50.pth         facexlib's ArcFace layout (IR-SE, narrow)

The detector is a real ONNX graph with SCRFD's inputs and outputs whose stride-32 score is high where a
32 x 32 cell of the input is bright: `face_image` (a white square on black) holds one face, a black image
none. Boxes and keypoints are fixed offsets (in stride units) from the anchor centre.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.face_id import DETECTOR_FILE, FACE_FOLDER, RECOGNITION_FILE, STRIDES, ArcFaceConfig, ArcFaceIRSE
from ..models.flux_infiniteyou import InfiniteYouProjector, ProjectorConfig
from .tiny import TINY, _write_sharded, write_json
from .tiny_controlnet import diffusers_controlnet_config, tiny_diffusers_controlnet

STAGE = Path("infu_flux_v1.0") / "aes_stage2"
PROJECTOR_FILE = STAGE / "image_proj_model.bin"
INFUSENET_FOLDER = STAGE / "InfuseNetModel"
ARCFACE_FILE = Path("supports") / "facexlib" / RECOGNITION_FILE
# keypoints of the detected face, in stride units from the anchor centre: eyes, nose, mouth corners
KEYPOINT_OFFSETS = ((-0.6, -0.5), (0.6, -0.5), (0.0, 0.1), (-0.5, 0.7), (0.5, 0.7))
BOX_DISTANCE = 2.0  # left, top, right, bottom in stride units


def _seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Parameters (and BatchNorm statistics) redrawn from (seed, name): weights 1/sqrt(fan_in)."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
            x = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                x = 1 + 0.1 * x.abs()
            elif t.ndim >= 2:
                x = x / t[0].numel() ** 0.5
            elif name.endswith("weight"):  # norm scales, PReLU slopes
                x = 1 + 0.1 * x
            else:
                x = 0.1 * x
            t.copy_(x)
    return model.eval()


def tiny_projector(seed: int = 0) -> InfiniteYouProjector:
    """2 layers of width 32, 2 heads of 64, 8 queries, 512 -> the tiny DiT's context width."""
    config = ProjectorConfig(dim=32, depth=2, heads=2, num_queries=8, embedding_dim=512,
                             output_dim=TINY["dit"]["context_dim"], ff_mult=4)
    return _seeded(InfiniteYouProjector(config), seed)


def tiny_arcface(seed: int = 0) -> ArcFaceIRSE:
    """IR-SE with one unit per stage (16, 32, 48, 64 wide; 112 -> 7 px) and a 512-d embedding."""
    units = ((16, 16, 2), (16, 32, 2), (32, 48, 2), (48, 64, 2))
    return _seeded(ArcFaceIRSE(ArcFaceConfig(units, stem=16, embedding=512)), seed)


def _detector_graph(input_size: tuple[int, int] | None = None):
    """SCRFD's interface: input `input.1` (1, 3, H, W) (any size, or fixed `input_size` (W, H)); outputs scores
    (N, 1) x 3 strides, then boxes (N, 4), then keypoints (N, 10), N = (H / s) (W / s) 2 anchors."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], {"score": [], "box": [], "kps": []}
    kps = np.array(KEYPOINT_OFFSETS, np.float32).reshape(-1)

    def const(name, array, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype), name))
        return name

    def head(kind: str, s: int, channels_per_anchor: int, weight: np.ndarray, bias: np.ndarray, sigmoid=False):
        name = f"{kind}_{s}"
        w = const(f"{name}_w", np.tile(weight, (2, 1)).reshape(2 * channels_per_anchor, 3, 1, 1))
        b = const(f"{name}_b", np.tile(bias, 2))
        nodes.append(helper.make_node("Conv", [f"pool_{s}", w, b], [f"{name}_conv"]))
        last = f"{name}_conv"
        if sigmoid:
            nodes.append(helper.make_node("Sigmoid", [last], [f"{name}_sig"]))
            last = f"{name}_sig"
        nodes.append(helper.make_node("Transpose", [last], [f"{name}_t"], perm=[0, 2, 3, 1]))
        shape = const(f"{name}_shape", [-1, channels_per_anchor], np.int64)
        nodes.append(helper.make_node("Reshape", [f"{name}_t", shape], [name]))
        outputs[kind].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{s}", channels_per_anchor]))

    for s in STRIDES:
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool_{s}"], kernel_shape=[s, s], strides=[s, s]))
        bright = s == 32  # only the stride-32 head sees faces: score ~1 on a white cell, ~0 on black
        head("score", s, 1, np.full((1, 3), 20 / 3 if bright else 0.0, np.float32),
             np.array([-10.0 if bright else -20.0], np.float32), sigmoid=True)
        head("box", s, 4, np.zeros((4, 3), np.float32), np.full(4, BOX_DISTANCE, np.float32))
        head("kps", s, 10, np.zeros((10, 3), np.float32), kps)
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                             [1, 3, *(input_size[::-1] if input_size else ("h", "w"))])],
                              outputs["score"] + outputs["box"] + outputs["kps"], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def face_image(size: int = 256, box: tuple[int, int, int, int] = (96, 96, 160, 160)) -> Image.Image:
    """A black image with a white square (x1, y1, x2, y2): one face for the tiny detector."""
    pixels = np.zeros((size, size, 3), np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    pixels[y1 + 8:y1 + 16, x1 + 8:x2 - 8] = (200, 120, 40)  # some colour, so that RGB/BGR order matters
    return Image.fromarray(pixels)


def write_face_models(root: str | Path, seed: int = 0, detector_size: tuple[int, int] | None = None) -> Path:
    """The detector (input size free, or fixed `detector_size` (W, H)) and the ArcFace weights under `root` (the
    InfiniteYou repo folder); returns the detector's folder."""
    import onnx
    root = Path(root)
    folder = root / FACE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(_detector_graph(detector_size), str(folder / DETECTOR_FILE))
    (root / ARCFACE_FILE).parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_arcface(seed).state_dict(), root / ARCFACE_FILE)
    return folder


def build_tiny_infiniteyou(root: str | Path, seed: int = 0, face_models: bool = True) -> Path:
    """Write the tiny InfiniteYou repo folder under `root` (see the module docstring); returns it."""
    root = Path(root)
    (root / STAGE).mkdir(parents=True, exist_ok=True)
    torch.save({"image_proj": tiny_projector(seed).state_dict()}, root / PROJECTOR_FILE)
    net = tiny_diffusers_controlnet("plain", num_double=2, num_single=2, seed=seed + 1)
    (root / INFUSENET_FOLDER).mkdir(parents=True, exist_ok=True)
    _write_sharded(root / INFUSENET_FOLDER, "diffusion_pytorch_model",
                   {k: v.contiguous() for k, v in net.state_dict().items()})
    write_json(root / INFUSENET_FOLDER / "config.json",
               {"_class_name": "FluxControlNetModel", **diffusers_controlnet_config("plain", 2, 2)})
    if face_models:
        write_face_models(root, seed)
    return root
