"""Face identity for InfiniteYou: detect the largest face, align it, embed it (a 512-d unit vector).

The same three steps as the InfiniteYou release, with its files:
1. Detection: the SCRFD detector of insightface's `antelopev2` pack (`scrfd_10g_bnkps.onnx`, run with
   onnxruntime) at 640 px, then 320, then 160 when nothing was found. Its 9 outputs are, for strides 8, 16
   and 32, the scores (N, 1), box distances (N, 4) and keypoint offsets (N, 10) of 2 anchors per cell, in
   stride units; boxes of score >= 0.5 go through NMS (IoU 0.4).
2. Alignment: the largest face's 5 keypoints -> the similarity transform (Umeyama, least squares) onto
   ArcFace's 112 px template, applied with a bilinear affine warp (black border).
3. Embedding: facexlib's ArcFace (IR-SE50, `recognition_arcface_ir_se50.pth`) on the aligned BGR crop in
   [-1, 1]; its output is L2-normalised.

Needs the `infiniteyou` extra (onnxruntime, opencv-python-headless).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from ..ops.images import convert_image

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNITION_FILE = "recognition_arcface_ir_se50.pth"
RECOGNITION_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/" + RECOGNITION_FILE
FACE_FOLDER = os.path.join("supports", "insightface", "models", "antelopev2")  # inside the InfiniteYou repo
DEFAULT_ROOT = os.path.join("models", "ByteDance", "InfiniteYou")
DETECTION_SIZES = (640, 320, 160)
STRIDES = (8, 16, 32)
ANCHORS = 2
SCORE_THRESHOLD, NMS_THRESHOLD = 0.5, 0.4
# ArcFace's 112 x 112 template: eyes, nose tip, mouth corners (x, y)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def _extra():
    """(onnxruntime, cv2), or an error naming the extra."""
    try:
        import cv2
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"InfiniteYou's face pipeline needs onnxruntime and OpenCV ({e.name} is missing): "
                          "pip install 'diffsynth-flux[infiniteyou]'") from None
    return onnxruntime, cv2


# ----------------------------------------------------------------------------- detection (SCRFD)

@dataclass
class Face:
    box: np.ndarray        # (4,) x1, y1, x2, y2 in image pixels
    score: float
    keypoints: np.ndarray  # (5, 2)

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


def anchor_centers(height: int, width: int, stride: int) -> np.ndarray:
    """(height * width * ANCHORS, 2) x, y pixel centres, cell-major (the anchors of a cell are adjacent)."""
    ys, xs = np.mgrid[:height, :width]
    centers = (np.stack([xs, ys], -1).astype(np.float32) * stride).reshape(-1, 2)
    return np.repeat(centers, ANCHORS, axis=0)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy NMS by descending score (insightface's +1 pixel area convention)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = w * h / (areas[i] + areas[rest] - w * h)
        order = rest[overlap <= threshold]
    return keep


class FaceDetector:
    def __init__(self, path: str, providers: list[str]):
        onnxruntime, self.cv2 = _extra()
        self.session = onnxruntime.InferenceSession(path, providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # a detector exported with a fixed input size runs at that size whatever size is asked (as insightface)
        h, w = inp.shape[2:4]
        self.fixed_size = (w, h) if isinstance(h, int) and isinstance(w, int) else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        if len(self.output_names) != 3 * len(STRIDES):
            raise ValueError(f"{path}: a SCRFD detector with keypoints has {3 * len(STRIDES)} outputs (scores, boxes, "
                             f"keypoints at strides {STRIDES}), this one has {len(self.output_names)}")

    def detect(self, rgb: np.ndarray, size: int) -> list[Face]:
        """Faces of an (H, W, 3) uint8 RGB image, letterboxed top-left into a size x size input (or into the
        detector's fixed input size), best first after NMS."""
        width, height = self.fixed_size or (size, size)
        h, w = rgb.shape[:2]
        new_h, new_w = (height, int(height / (h / w))) if h / w > height / width else (int(width * (h / w)), width)
        scale = new_h / h
        canvas = np.zeros((height, width, 3), np.uint8)
        canvas[:new_h, :new_w] = self.cv2.resize(rgb, (new_w, new_h))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]  # (1, 3, height, width) RGB
        outs = [o[0] if o.ndim == 3 else o for o in self.session.run(self.output_names, {self.input_name: blob})]
        scores, boxes, kps = [], [], []
        for i, stride in enumerate(STRIDES):
            centers = anchor_centers(height // stride, width // stride, stride)
            keep = np.where(outs[i][:, 0] >= SCORE_THRESHOLD)[0]
            dist, offsets = outs[i + 3][keep] * stride, outs[i + 6][keep].reshape(-1, 5, 2) * stride
            c = centers[keep]
            scores.append(outs[i][keep, 0])
            boxes.append(np.concatenate([c - dist[:, :2], c + dist[:, 2:]], 1))
            kps.append(c[:, None] + offsets)
        scores, boxes, kps = np.concatenate(scores), np.concatenate(boxes) / scale, np.concatenate(kps) / scale
        order = scores.argsort()[::-1]
        scores, boxes, kps = scores[order], boxes[order], kps[order]
        return [Face(boxes[i], float(scores[i]), kps[i]) for i in nms(boxes, scores)]

    def largest_face(self, rgb: np.ndarray) -> Face | None:
        """The largest face found at the first detection size that finds any (640, then 320, then 160)."""
        for size in DETECTION_SIZES:
            faces = self.detect(rgb, size)
            if faces:
                return sorted(faces, key=lambda f: f.area)[-1]  # stable: the last of equal areas, as the reference
        return None


# ----------------------------------------------------------------------------- alignment

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity (rotation, uniform scale, translation) mapping src (n, 2) onto dst
    (Umeyama 1991). Computed in the points' dtype up to the SVD (float32 keypoints: as insightface's
    alignment does), so that the warped crops match it to the pixel."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    d = np.array([1.0, 1.0 if np.linalg.det(cov) >= 0 else -1.0])
    u, s, vt = np.linalg.svd(cov)
    rotation = u @ np.diag(d) @ vt
    scale = 1.0 / src_c.var(0).sum() * (s @ d)
    return np.concatenate([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]], 1)


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """The face warped onto ArcFace's template: (size, size, C) uint8, bilinear, black outside the image."""
    _, cv2 = _extra()
    matrix = similarity_transform(keypoints, ARCFACE_TEMPLATE * (size / 112))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


# ----------------------------------------------------------------------------- ArcFace (IR-SE, facexlib layout)

class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        self.stride = stride
        self.shortcut_layer = None if in_channels == depth else nn.Sequential(
            nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SqueezeExcite(depth))

    def forward(self, x):
        # same width: the shortcut is a 1x1 max-pool of stride s, i.e. subsampling
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.shortcut_layer is None else self.shortcut_layer(x)
        return self.res_layer(x) + shortcut


@dataclass
class ArcFaceConfig:
    units: tuple[tuple[int, int, int], ...]  # (in_channels, depth, stride) per bottleneck
    stem: int = 64
    embedding: int = 512


class ArcFaceIRSE(nn.Module):
    """112 x 112 face crop (B, 3, 112, 112) in [-1, 1] -> (B, 512) L2-normalised embedding."""

    def __init__(self, config: ArcFaceConfig):
        super().__init__()
        self.config = config
        last = config.units[-1][1]
        self.input_layer = nn.Sequential(nn.Conv2d(3, config.stem, 3, 1, 1, bias=False), nn.BatchNorm2d(config.stem),
                                         nn.PReLU(config.stem))
        self.body = nn.Sequential(*(BottleneckIRSE(*u) for u in config.units))
        self.output_layer = nn.Sequential(nn.BatchNorm2d(last), nn.Dropout(), nn.Flatten(),
                                          nn.Linear(last * 7 * 7, config.embedding), nn.BatchNorm1d(config.embedding))

    def forward(self, x):
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / x.norm(dim=1, keepdim=True)


def infer_arcface_config(shapes: dict[str, tuple[int, ...]]) -> ArcFaceConfig:
    """Widths from the conv shapes; each stage's first unit (the first unit, or where the width changes)
    halves the resolution, as in IR-SE50 (64, 128, 256, 512 wide; 3, 4, 14, 3 units)."""
    n = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("body."))
    units = []
    for i in range(n):
        depth, in_channels = shapes[f"body.{i}.res_layer.1.weight"][:2]
        units.append((in_channels, depth, 2 if i == 0 or in_channels != depth else 1))
    return ArcFaceConfig(tuple(units), stem=shapes["input_layer.0.weight"][0],
                         embedding=shapes["output_layer.3.weight"][0])


def load_arcface(path: str) -> ArcFaceIRSE:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = ArcFaceIRSE(infer_arcface_config({k: tuple(v.shape) for k, v in sd.items()}))
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- the whole face pipeline

def face_folder(projector_source: str = "") -> Path:
    """antelopev2's folder: inside the InfiniteYou repo holding the projector file (any parent folder of it),
    else under ./models/ByteDance/InfiniteYou."""
    for parent in Path(projector_source).resolve().parents if projector_source else ():
        if (parent / FACE_FOLDER).is_dir():
            return parent / FACE_FOLDER
    return Path(DEFAULT_ROOT) / FACE_FOLDER


def recognition_file(folder: Path) -> Path:
    """facexlib's ArcFace weights: beside the detector, in the repo's supports/facexlib folder, or where
    facexlib downloads them (<site-packages>/facexlib/weights)."""
    candidates = [folder / RECOGNITION_FILE]
    if folder.as_posix().endswith(Path(FACE_FOLDER).as_posix()):  # <repo>/supports/insightface/models/antelopev2
        candidates.append(folder.parents[2] / "facexlib" / RECOGNITION_FILE)
    spec = importlib.util.find_spec("facexlib")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "weights" / RECOGNITION_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"InfiniteYou's face embedding needs {RECOGNITION_FILE} (facexlib's ArcFace, "
                            f"{RECOGNITION_URL}); looked in: {', '.join(str(p.parent) for p in candidates)}")


class FaceEmbedder:
    """image -> (512,) ArcFace embedding of its largest face. Not an nn.Module: its weights are fixed inputs
    of the pipeline, never trained or saved with it."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        onnxruntime, self.cv2 = _extra()
        detector = folder / DETECTOR_FILE
        if not detector.is_file():
            raise FileNotFoundError(
                f"InfiniteYou's face models are missing: expected {DETECTOR_FILE} (and the rest of insightface's "
                f"antelopev2 pack) in {folder}; download the InfiniteYou repo's supports/insightface folder")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.detector = FaceDetector(str(detector), providers)
        self.arcface = load_arcface(str(recognition_file(folder))).to(device, dtype)
        self.device, self.dtype = device, dtype

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rgb = np.asarray(convert_image(image))
        face = self.detector.largest_face(rgb)
        if face is None:
            raise ValueError("infinityou_id_image: no face found (detection at 640, 320 and 160 px); give a photo "
                             "with a clearly visible face")
        crop = align_face(np.ascontiguousarray(rgb[..., ::-1]), face.keypoints)  # BGR, as ArcFace was trained
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].to(self.device, torch.float32) / 255 * 2 - 1
        return self.arcface(x.to(self.dtype))[0]
