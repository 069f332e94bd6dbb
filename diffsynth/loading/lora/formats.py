"""LoRA file dialects -> one canonical form (see the package docstring for the dialect table)."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ...models.flux_dit import (_BFL_DOUBLE, _BFL_SINGLE, _BFL_TOP, _DIFFUSERS_DOUBLE, _DIFFUSERS_FUSED,
                                _DIFFUSERS_SINGLE, _DIFFUSERS_TOP, _swap_halves, bfl_key_to_internal)
from ...ops.files import CheckpointError, all_finite


# ----------------------------------------------------------------------------- canonical form

@dataclass
class LoRAWeights:
    """One low-rank update: ``delta W = (alpha / rank) * up @ down`` (+ ``bias_up`` on the bias)."""
    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float | None = None  # None: alpha = rank, scale 1
    bias_up: torch.Tensor | None = None  # (out_features,), PEFT lora_B bias
    source: tuple[str, ...] = field(default=(), compare=False)  # key stems of the file it came from

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The fp32 weight update at strength 1."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class CanonicalLoRA:
    layers: dict[str, LoRAWeights] = field(default_factory=dict)
    norm_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    te_layers: dict[str, LoRAWeights] = field(default_factory=dict)
    dialect: str = "diffsynth"
    unknown: dict[str, str] = field(default_factory=dict)  # file key -> why it could not be converted

    def text_encoder_part(self) -> "CanonicalLoRA":
        """The CLIP part as a LoRA of its own, to pass to `apply_lora(text_encoder, ...)`."""
        return CanonicalLoRA(layers=dict(self.te_layers), dialect=self.dialect)


@dataclass
class LoRAReport:
    """What `apply_lora` / `load_lora_into_pipeline` did."""
    mode: str  # "merge" or "hotload"
    applied: list[str] = field(default_factory=list)  # module names (text-encoder ones prefixed "text_encoder_1.")
    norms: list[str] = field(default_factory=list)  # replaced norm parameters
    widened: list[str] = field(default_factory=list)  # linears whose input was widened
    skipped: list[str] = field(default_factory=list)  # entries not applied (only with strict=False)


# ----------------------------------------------------------------------------- key names -> targets

@dataclass(frozen=True)
class _Target:
    space: str  # "dit" or "te"
    name: str  # internal module name / CLIP module name
    parts: tuple[int, int] | None = None  # [first, last) part of a fused layer; None: the whole layer
    swap: bool = False  # BFL final modulation: (shift, scale) rows -> (scale, shift)


# Fused internal layers: how many parts they hold (q, k, v [, mlp]); each q/k/v part is `hidden` rows.
_FUSED_PARTS = {"attn.a_to_qkv": 3, "attn.b_to_qkv": 3, "to_qkv_mlp": 4}
_NORM_PARAM = re.compile(r"(.*\.)?norm_[qk]_[ab]\.weight")

_KOHYA_TOP = {k.replace(".", "_"): k for k in _BFL_TOP}
_KOHYA_BLOCK = {kind: {k.replace(".", "_"): k for k in table if not k.endswith(".scale")}
                for kind, table in (("double_blocks", _BFL_DOUBLE), ("single_blocks", _BFL_SINGLE))}
_KOHYA_BLOCK["single_blocks"]["linear1_qkv"] = "linear1_qkv"  # ComfyUI: first 3*hidden rows of linear1

_DIFFUSERS_PART = {(kind, part): (fused, i) for (kind, fused), parts in _DIFFUSERS_FUSED.items()
                   for i, part in enumerate(parts)}
_DIFFUSERS_BLOCK = {"transformer_blocks": _DIFFUSERS_DOUBLE, "single_transformer_blocks": _DIFFUSERS_SINGLE}
_DIFFUSERS_US = {kind: {name.replace(".", "_"): name
                        for name in [*table, *(p for (k, p) in _DIFFUSERS_PART if k == kind)]}
                 for kind, table in _DIFFUSERS_BLOCK.items()}
_DIFFUSERS_TOP_US = {k.replace(".", "_"): k for k in _DIFFUSERS_TOP}

_INTERNAL_BLOCK = {"blocks": set(_BFL_DOUBLE.values()), "single_blocks": set(_BFL_SINGLE.values())}
_INTERNAL_TOP = set(_BFL_TOP.values())

_XLABS = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
          "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1_qkv", "proj_lora": "linear2"}

_CLIP_SUB = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
             "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
             "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}


def _bfl_target(path: str) -> _Target | None:
    """A BFL module name (``double_blocks.0.img_attn.qkv``) as a target."""
    m = re.fullmatch(r"single_blocks\.(\d+)\.linear1_qkv", path)
    if m:
        return _Target("dit", f"single_blocks.{m.group(1)}.to_qkv_mlp", parts=(0, 3))
    name = bfl_key_to_internal(path + ".weight")
    if name is None or not name.endswith(".weight") or _NORM_PARAM.fullmatch(name):
        return None
    name = name[: -len(".weight")]
    return _Target("dit", name, swap=name == "final_norm_out.linear")


def _kohya_target(name: str) -> _Target | None:
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(\w+)", name)
    if m:
        kind, idx, rest = m.groups()
        bfl = _KOHYA_BLOCK[kind].get(rest)
        return _bfl_target(f"{kind}.{idx}.{bfl}") if bfl else None
    return _bfl_target(_KOHYA_TOP[name]) if name in _KOHYA_TOP else None


def _diffusers_module(path: str) -> _Target | None:
    """A diffusers module name (linear or norm) as a target."""
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if m:
        kind, idx, rest = m.groups()
        block = f"{'blocks' if kind == 'transformer_blocks' else 'single_blocks'}.{idx}."
        if (kind, rest) in _DIFFUSERS_PART:
            fused, i = _DIFFUSERS_PART[kind, rest]
            return _Target("dit", block + fused, parts=(i, i + 1))
        name = _DIFFUSERS_BLOCK[kind].get(rest)
        return _Target("dit", block + name) if name else None
    return _Target("dit", _DIFFUSERS_TOP[path]) if path in _DIFFUSERS_TOP else None


def _diffusers_target(path: str) -> _Target | None:
    t = _diffusers_module(path)
    return None if t is None or _NORM_PARAM.fullmatch(t.name + ".weight") else t


def _onetrainer_target(name: str) -> _Target | None:
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)_(\d+)_(\w+)", name)
    if m:
        kind, idx, rest = m.groups()
        path = _DIFFUSERS_US[kind].get(rest)
        return _diffusers_target(f"{kind}.{idx}.{path}") if path else None
    return _diffusers_target(_DIFFUSERS_TOP_US[name]) if name in _DIFFUSERS_TOP_US else None


def _internal_target(name: str) -> _Target | None:
    m = re.fullmatch(r"(blocks|single_blocks)\.(\d+)\.(.+)", name)
    ok = m.group(3) in _INTERNAL_BLOCK[m.group(1)] if m else name in _INTERNAL_TOP
    return _Target("dit", name) if ok else None


def _xlabs_target(path: str) -> _Target | None:
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)", path)
    if not m or m.group(3) not in _XLABS:
        return None
    return _bfl_target(f"{m.group(1)}.{m.group(2)}.{_XLABS[m.group(3)]}")


def _clip_target(name: str) -> _Target | None:
    m = re.fullmatch(r"(?:text_model[._])?encoder[._]layers[._](\d+)[._](.+)", name)
    sub = _CLIP_SUB.get(m.group(2).replace(".", "_")) if m else None
    return _Target("te", f"text_model.encoder.layers.{m.group(1)}.{sub}") if sub else None


def _dit_path_target(path: str) -> _Target | None:
    return _xlabs_target(path) or _bfl_target(path) or _diffusers_target(path) or _internal_target(path)


_DIT_PREFIXES = ("pipe.dit.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_PREFIXED: tuple[tuple[str, Callable[[str], _Target | None]], ...] = (
    ("lora_unet_", _kohya_target), ("lora_transformer_", _onetrainer_target),
    ("lora_te1_", _clip_target), ("lora_te_", _clip_target),
    ("text_encoders.clip_l.transformer.", _clip_target), ("text_encoder.", _clip_target),
    *((p, _dit_path_target) for p in _DIT_PREFIXES),
)


def _resolve(stem: str) -> _Target | None:
    """Where the LoRA pair named `stem` (key without ``.lora_down.weight`` etc.) goes; None: unknown."""
    for prefix, fn in _PREFIXED:
        if stem.startswith(prefix):
            return fn(stem[len(prefix):])
    return _dit_path_target(stem)


def _resolve_norm(key: str) -> str | None:
    """A full (non-LoRA) tensor: the internal norm parameter it replaces, or None."""
    for p in _DIT_PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
            break
    name = bfl_key_to_internal(key)
    if name is None and key.endswith(".weight"):
        t = _diffusers_module(key[: -len(".weight")]) or _internal_target(key)
        name = t and (t.name if t.name.endswith(".weight") else t.name + ".weight")
    return name if name and _NORM_PARAM.fullmatch(name) else None


def _listing(items, limit: int = 40) -> str:
    lines = [f"{k}: {v}" for k, v in items.items()] if isinstance(items, Mapping) else list(items)
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "".join(f"\n  {line}" for line in lines[:limit]) + more


# ----------------------------------------------------------------------------- dialect detection

def detect_dialect(sd: Mapping[str, object]) -> str:
    """Name of the LoRA file dialect of `sd` (see the module docstring); "unknown" if none fits."""
    keys = list(sd)

    def any_(pred) -> bool:
        return any(pred(k) for k in keys)

    if any_(lambda k: re.search(r"\.processor\.(qkv|proj)_lora", k)):
        return "xlabs"
    if any_(lambda k: k.startswith("lora_transformer_")):
        return "onetrainer"
    if any_(lambda k: k.startswith(("lora_unet_", "lora_te_", "lora_te1_"))):
        return "kohya"
    if any_(lambda k: k.startswith("base_model.model.")):
        return "fal_kontext"
    if any_(lambda k: k.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders."))):
        return "comfyui"
    if any_(lambda k: k.endswith(("query_norm.scale", "key_norm.scale"))):
        return "bfl_control"
    if any_(lambda k: ".default." in k or k.startswith("pipe.dit.")):
        return "diffsynth"
    if any_(lambda k: k.startswith(("transformer.", "text_encoder."))):
        return "peft"
    # bare names: the naming scheme most keys follow (x_embedder is both diffusers and internal)
    votes = Counter()
    for stem in {_split_key(k)[0] for k in keys}:
        votes.update(name for name, fn in (("bfl", _bfl_target), ("diffusers", _diffusers_target),
                                           ("diffsynth", _internal_target)) if fn(stem))
    return votes.most_common(1)[0][0] if votes else "unknown"


# ----------------------------------------------------------------------------- conversion

_ROLES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.default.bias", "down_bias"), (".lora_B.default.bias", "up_bias"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_down.bias", "down_bias"),
    (".lora_up.bias", "up_bias"), (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.bias", "down_bias"), (".lora_B.bias", "up_bias"), (".lora.down.weight", "down"),
    (".lora.up.weight", "up"), (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha"),
)


def _split_key(key: str) -> tuple[str, str]:
    """``stem.lora_down.weight`` -> (stem, "down"); a tensor that is not part of a LoRA pair -> (key, "full")."""
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return key, "full"


def _reject_unsupported(keys: list[str]) -> None:
    dora = [k for k in keys if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:
        raise ValueError(f"DoRA LoRAs are not supported (weight-decomposed magnitude keys such as {dora[:3]}); "
                         "convert it to a plain LoRA first")
    lyco = [k for k in keys if re.search(r"(^|[._])(hada|lokr)_|\.lora_mid\.", k)]
    if lyco:
        raise ValueError(f"LyCORIS LoHa/LoKr/LoCon LoRAs are not supported (keys such as {lyco[:3]})")


def _peft_alpha_lookup(metadata: Mapping[str, object] | None) -> Callable[[str], float | None]:
    """Per-module alpha from diffusers' ``lora_adapter_metadata`` (LoraConfig kwargs, possibly prefixed)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw is None and metadata and any(str(k).endswith("lora_alpha") for k in metadata):
        raw = metadata  # already the parsed config
    if raw is None:
        return lambda stem: None
    config = json.loads(raw) if isinstance(raw, str) else dict(raw)
    components: dict[str, dict] = {}
    for k, v in config.items():
        comp, _, rest = k.partition(".") if k.startswith(("transformer.", "text_encoder.")) else ("", "", k)
        components.setdefault(comp, {})[rest] = v
    if any(c.get("use_dora") for c in components.values()):
        raise ValueError("DoRA LoRAs are not supported (lora_adapter_metadata says use_dora=true)")

    def lookup(stem: str) -> float | None:
        comp = next((c for c in ("transformer", "text_encoder") if stem.startswith(c + ".")), "")
        cfg = components.get(comp) or components.get("")
        if not cfg or "lora_alpha" not in cfg:
            return None
        path = stem[len(comp) + 1:] if comp else stem
        patterns = cfg.get("alpha_pattern") or {}
        for exact in (path, "^" + path):  # diffusers writes full module paths: an exact one wins
            if exact in patterns:
                return float(patterns[exact])
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", path):  # else PEFT's rule: first suffix match
                return float(value)
        return float(cfg["lora_alpha"])

    return lookup


def _fuse(name: str, pieces: list[tuple[_Target, LoRAWeights]], mlp_ratio: float,
          unknown: dict[str, str]) -> LoRAWeights | None:
    """Fuse LoRAs of parts of a fused layer (q, k, v [, mlp]) into one exact block LoRA."""
    n_parts = _FUSED_PARTS.get(name.split(".", 2)[-1])
    if n_parts is None:
        for _, lw in pieces:
            unknown.update({s: f"{name} is not a fused layer" for s in lw.source})
        return None
    hidden = pieces[0][1].down.shape[1]
    sizes = [hidden] * 3 + ([int(hidden * mlp_ratio)] if n_parts == 4 else [])
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    pieces = sorted(pieces, key=lambda p: p[0].parts or (0, n_parts))
    used: set[int] = set()
    for t, lw in pieces:
        p0, p1 = t.parts or (0, n_parts)
        why = None
        if used & set(range(p0, p1)):
            why = f"{name}: two LoRAs for the same rows"
        elif lw.down.shape[1] != hidden or lw.up.shape[0] != offsets[p1] - offsets[p0]:
            why = (f"{name}: shape {tuple(lw.up.shape)}x{tuple(lw.down.shape)} "
                   f"does not fit rows {offsets[p0]}:{offsets[p1]}")
        if why:
            unknown.update({s: why for s in lw.source})
            return None
        used.update(range(p0, p1))
    if len(pieces) == 1 and pieces[0][0].parts in (None, (0, n_parts)):
        return pieces[0][1]
    exact = all(lw.scale == 1.0 for _, lw in pieces)
    dtype = pieces[0][1].up.dtype if exact and len({lw.up.dtype for _, lw in pieces}) == 1 else torch.float32
    rank = sum(lw.rank for _, lw in pieces)
    up = torch.zeros(offsets[-1], rank, dtype=dtype)
    has_bias = any(lw.bias_up is not None for _, lw in pieces)
    bias = torch.zeros(offsets[-1], dtype=dtype) if has_bias else None
    col = 0
    for t, lw in pieces:
        p0, p1 = t.parts or (0, n_parts)
        rows = slice(offsets[p0], offsets[p1])
        up[rows, col: col + lw.rank] = lw.up if lw.scale == 1.0 else lw.up.float() * lw.scale
        if lw.bias_up is not None:
            bias[rows] = lw.bias_up if lw.scale == 1.0 else lw.bias_up.float() * lw.scale
        col += lw.rank
    down = torch.cat([lw.down.to(dtype) for _, lw in pieces], dim=0)
    return LoRAWeights(down, up, None, bias, tuple(s for _, lw in pieces for s in lw.source))


def convert_lora(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None,
                 mlp_ratio: float = 4.0) -> CanonicalLoRA:
    """Read a LoRA state dict of any supported dialect into the canonical form.

    `metadata` is the safetensors header (diffusers stores ``lora_alpha`` there). `mlp_ratio` sizes the
    MLP rows of single-block ``to_qkv_mlp`` when only its q/k/v part is given. Keys that cannot be
    converted are kept in ``.unknown`` (key -> reason); `apply_lora` reports them. DoRA and LyCORIS
    files raise ValueError.
    """
    keys = list(sd)
    _reject_unsupported(keys)
    alpha_of = _peft_alpha_lookup(metadata)
    lora = CanonicalLoRA(dialect=detect_dialect(sd))
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for k in keys:
        stem, role = _split_key(k)
        if role == "full":
            name = _resolve_norm(k)
            if name is None:
                lora.unknown[k] = "not a LoRA tensor and not a known norm weight"
            else:
                lora.norm_weights[name] = sd[k]
            continue
        stems.setdefault(stem, {})[role] = sd[k]

    grouped: dict[tuple[str, str], list[tuple[_Target, LoRAWeights]]] = {}
    for stem, parts in stems.items():
        if "down" not in parts or "up" not in parts:
            lora.unknown[stem] = f"incomplete LoRA pair (has only {sorted(parts)})"
            continue
        target = _resolve(stem)
        if target is None:
            lora.unknown[stem] = "no matching FLUX DiT or CLIP layer name"
            continue
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            lora.unknown[stem] = f"not a linear LoRA (down {tuple(down.shape)}, up {tuple(up.shape)})"
            continue
        alpha = float(parts["alpha"].item()) if "alpha" in parts else alpha_of(stem)
        problem = _unusable(down, alpha, parts)
        if problem:
            lora.unknown[stem] = problem
            continue
        bias = parts.get("up_bias")
        if "down_bias" in parts:  # B (A x + a) = B A x + B a
            bias = (0 if bias is None else bias.float()) + up.float() @ parts["down_bias"].float()
        if target.swap:
            up = _swap_halves(up)
            bias = None if bias is None else _swap_halves(bias)
        grouped.setdefault((target.space, target.name), []).append(
            (target, LoRAWeights(down, up, alpha, bias, (stem,))))

    for (space, name), pieces in grouped.items():
        whole = [p for p in pieces if p[0].parts is None]
        if len(pieces) == 1 and whole:
            lw = whole[0][1]
        elif whole and len(whole) == len(pieces):
            lora.unknown.update({s: f"several LoRAs for {name}" for _, lw in pieces for s in lw.source})
            continue
        else:
            lw = _fuse(name, pieces, mlp_ratio, lora.unknown)
            if lw is None:
                continue
        (lora.layers if space == "dit" else lora.te_layers)[name] = lw
    return lora


def _unusable(down: torch.Tensor, alpha: float | None, parts: dict[str, torch.Tensor]) -> str | None:
    """Why a LoRA pair cannot be applied (rank 0 divides by zero; NaN/Inf would poison every output)."""
    if down.shape[0] == 0:
        return "rank 0 (no LoRA weights)"
    ints = sorted({str(t.dtype).replace("torch.", "") for t in parts.values() if not t.is_floating_point()})
    if ints:  # quantized integers without their scales would be applied as if they were the weights
        return f"integer weights ({', '.join(ints)}); a LoRA's weights are floating point"
    if alpha is not None and not math.isfinite(alpha):
        return f"alpha is {alpha}"
    bad = [role for role, t in parts.items() if not all_finite(t)]
    return f"NaN/Inf in its {', '.join(sorted(bad))} weights" if bad else None


def lora_from_peft_model_state(sd: Mapping[str, torch.Tensor], lora_alpha: float | None = None) -> CanonicalLoRA:
    """Our training output (internal names, ``lora_A.default.weight``) -> canonical; raises on stray keys.

    `lora_alpha` is the PEFT ``LoraConfig.lora_alpha`` used in training (None: alpha = rank).
    """
    lora = convert_lora(sd)
    if lora.unknown:
        raise ValueError("not a FLUX DiT LoRA state dict: " + _listing(lora.unknown))
    if lora_alpha is not None:
        for lw in lora.layers.values():
            lw.alpha = float(lora_alpha)
    lora.dialect = "diffsynth"
    return lora


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and (safetensors) header metadata."""
    from ...ops.files import load_state_dict, scan_file
    path = str(path)
    refuse_model_checkpoint(path)
    metadata = scan_file(path)[1] if os.path.isfile(path) else {}
    return load_state_dict(path), metadata


def refuse_model_checkpoint(path: str) -> None:
    """A model checkpoint given as a LoRA: one line saying what it is (its every key was listed as unmatched)."""
    from ...ops.files import scan
    from .. import components
    from ..registry import detect, looks_like_lora
    if looks_like_lora(scan(path)):
        return
    try:
        found = detect(path)
    except (CheckpointError, ValueError):  # not a model either: the key-by-key report says what it holds
        return
    if found:
        kinds = " + ".join(components.FAMILY_BY_NAME[d.family].description for d in found)
        raise CheckpointError(f"{path} is a {kinds} checkpoint, not a LoRA (full weights, no low-rank pairs)")


def _as_canonical(lora, mlp_ratio: float = 4.0) -> CanonicalLoRA:
    if isinstance(lora, CanonicalLoRA):
        return lora
    lora = _resolve_config(lora)
    if isinstance(lora, (str, os.PathLike)):
        sd, metadata = read_lora_file(lora)
        return _not_empty(convert_lora(sd, metadata, mlp_ratio), str(lora))
    if isinstance(lora, Mapping):
        return _not_empty(convert_lora(lora, mlp_ratio=mlp_ratio), "the LoRA state dict")
    raise TypeError(f"expected a LoRA path, ModelConfig, state dict or CanonicalLoRA, got {type(lora).__name__}")


def _not_empty(lora: CanonicalLoRA, source: str) -> CanonicalLoRA:
    """A LoRA with nothing in it would be "applied" without changing anything: refuse it."""
    if not (lora.layers or lora.te_layers or lora.norm_weights or lora.unknown):
        raise ValueError(f"{source} holds no LoRA tensors (an empty or unfinished file?)")
    return lora


def _resolve_config(lora):
    """A ModelConfig (what DiffSynth-Studio's LoRA scripts pass) becomes its one local file, fetched if missing."""
    from ..model_config import ModelConfig
    if not isinstance(lora, ModelConfig):
        return lora
    path = lora.resolve()
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{lora!r} matches {len(path)} files ({path[:3]}...); a LoRA is one file: "
                         "narrow origin_file_pattern")
    return path
