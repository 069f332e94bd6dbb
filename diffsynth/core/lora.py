"""LoRA for FLUX.1: read the common file dialects into one canonical form, apply it, export it.

Canonical form (`CanonicalLoRA`):

* ``layers``: internal DiT module name (``blocks.0.attn.a_to_qkv``) -> `LoRAWeights`
  (``down`` (r, in), ``up`` (out, r), ``alpha`` or None, optional ``bias_up`` (out,));
* ``norm_weights``: internal parameter name -> full replacement tensor (BFL Control-LoRA RMSNorm scales);
* ``te_layers``: CLIP text-encoder module name (HF ``text_model.encoder.layers.N.self_attn.q_proj``) -> `LoRAWeights`.

One layer's update is ``W += strength * scale * up @ down`` and ``bias += strength * scale * bias_up``
with ``scale = alpha / rank`` (alpha defaults to the rank, so scale 1). Every layer keeps its own alpha.

Dialects read by `convert_lora` (names from `detect_dialect`):

=============  ==================================================================================
kohya          ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up`` / ``.alpha``;
               CLIP ``lora_te1_*`` / ``lora_te_*``
onetrainer     ``lora_transformer_<diffusers path with _>.lora_down.weight`` (+ ``lora_te1_*``)
comfyui        ``diffusion_model.<BFL key>.lora_down|lora_A...``; CLIP ``text_encoders.clip_l.transformer.*``
peft           diffusers ``transformer.<diffusers path>.lora_A.weight`` (+ ``.alpha`` or header metadata),
               CLIP ``text_encoder.*``; ``diffusers`` is the same without the ``transformer.`` prefix
xlabs          ``double_blocks.0.processor.qkv_lora1.down.weight`` ... (no alpha)
bfl_control    bare BFL keys with ``lora_A/lora_B`` (+ ``lora_B.bias``) and full ``query_norm.scale`` /
               ``key_norm.scale``; its ``img_in`` may be wider than the model's ``x_embedder``
               (`widen_linear_input`). ``bfl`` is the same without the norms.
fal_kontext    ``base_model.model.<BFL key>.lora_A.weight``
diffsynth      internal names: ``blocks.0.attn.a_to_qkv.lora_A.default.weight`` or ``.lora_A.weight``,
               optionally prefixed ``pipe.dit.``
=============  ==================================================================================

Separate q/k/v (and single-block ``proj_mlp``) LoRAs are fused exactly into the fused internal layers:
the downs are stacked along the rank, the up is block-diagonal (absent parts are zero blocks) and each
part's alpha/rank is folded into its block, so the fused layer has ``alpha=None``.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .quant import add_to_weight, quant_type
from .vram import compute_spec
from ..models.flux_dit import (_BFL_DOUBLE, _BFL_SINGLE, _BFL_TOP, _DIFFUSERS_DOUBLE, _DIFFUSERS_FUSED,
                               _DIFFUSERS_SINGLE, _DIFFUSERS_TOP, _swap_halves, bfl_key_to_internal,
                               internal_key_to_bfl)

__all__ = [
    "LoRAWeights", "CanonicalLoRA", "LoRAReport", "detect_dialect", "convert_lora", "apply_lora", "clear_lora",
    "load_lora_into_pipeline", "widen_linear_input", "export_kohya", "export_peft", "save_lora",
    "read_lora_file", "lora_from_peft_model_state", "describe_lora",
]


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
    from .loading import load_state_dict, scan_file
    path = str(path)
    metadata = scan_file(path)[1] if os.path.isfile(path) else {}
    return load_state_dict(path), metadata


def _as_canonical(lora, mlp_ratio: float = 4.0) -> CanonicalLoRA:
    if isinstance(lora, CanonicalLoRA):
        return lora
    if isinstance(lora, (str, os.PathLike)):
        sd, metadata = read_lora_file(lora)
        return convert_lora(sd, metadata, mlp_ratio)
    if isinstance(lora, Mapping):
        return convert_lora(lora, mlp_ratio=mlp_ratio)
    raise TypeError(f"expected a LoRA path, state dict or CanonicalLoRA, got {type(lora).__name__}")


# ----------------------------------------------------------------------------- application

_HOOK = "_diffsynth_lora_hook"
_ADAPTERS = "_diffsynth_lora_adapters"
_SAVED_WEIGHT = "_diffsynth_lora_saved_weight"
_SAVED_INPUT = "_diffsynth_lora_saved_input"
_MERGEABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class _HotLoRA:
    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    weight: float  # strength * alpha / rank

    def to_(self, device: torch.device) -> None:
        self.down, self.up = self.down.to(device), self.up.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)


@dataclass
class _Plan:
    layers: list[tuple[str, nn.Module, LoRAWeights]] = field(default_factory=list)
    norms: list[tuple[str, nn.Module, torch.Tensor]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def _find_module(named: dict[str, nn.Module], name: str) -> str | None:
    """`name` in `module.named_modules()`; also inside a wrapper (unique suffix) and CLIP without ``text_model.``."""
    candidates = [name] + ([name[len("text_model."):]] if name.startswith("text_model.") else [])
    for c in candidates:
        if c in named:
            return c
    for c in candidates:
        hits = [n for n in named if n.endswith("." + c)]
        if len(hits) == 1:
            return hits[0]
    return None


def _weight_shape(sub: nn.Module) -> tuple[int, ...]:
    """Logical weight shape; a GGUF layer keeps raw blocks in `.weight` and its real shape beside it."""
    w = getattr(sub, "weight", None)
    return getattr(sub, "weight_shape", None) or (tuple(w.shape) if isinstance(w, torch.Tensor) else ())


def _plan(module: nn.Module, lora: CanonicalLoRA, merge: bool, layers: dict[str, LoRAWeights] | None = None) -> _Plan:
    """Match every layer/norm of `lora` to `module` without changing anything."""
    plan = _Plan()
    named = dict(module.named_modules())
    for name, lw in (lora.layers if layers is None else layers).items():
        src = ", ".join(lw.source) or name
        found = _find_module(named, name)
        if found is None:
            plan.unmatched.append(f"{src} -> {name}: no such layer in {type(module).__name__}")
            continue
        sub = named[found]
        w = getattr(sub, "weight", None)
        shape = _weight_shape(sub)
        if len(shape) != 2:
            plan.unmatched.append(f"{src} -> {found}: not a linear layer")
            continue
        out_f, in_f = shape
        # Control LoRAs widen x_embedder (extra input channels); a plain LoRA on a widened x_embedder
        # leaves the extra channels alone (zero down columns).
        widen = lw.down.shape[1] > in_f and name == "x_embedder"
        if lw.down.shape[1] < in_f and name == "x_embedder" and lw.up.shape[0] == out_f:
            pad = lw.down.new_zeros(lw.rank, in_f - lw.down.shape[1])
            lw = LoRAWeights(torch.cat([lw.down, pad], 1), lw.up, lw.alpha, lw.bias_up, lw.source)
        if lw.up.shape[0] != out_f or (lw.down.shape[1] != in_f and not widen):
            plan.unmatched.append(f"{src} -> {found}: LoRA shape ({lw.up.shape[0]}, {lw.down.shape[1]}) "
                                  f"!= layer ({out_f}, {in_f})")
            continue
        if lw.bias_up is not None and getattr(sub, "bias", None) is None:
            plan.unmatched.append(f"{src} -> {found}: LoRA has a bias but the layer has none")
            continue
        if merge and (w.device.type == "meta" or quant_type(sub) is not None):
            plan.unmatched.append(f"{src} -> {found}: cannot merge into a {quant_type(sub) or w.dtype} weight "
                                  f"on {w.device} (GGUF-quantized or meta); use hotload=True")
            continue
        plan.layers.append((found, sub, lw))
    if layers is None:
        for pname, value in lora.norm_weights.items():
            mod_name, _, attr = pname.rpartition(".")
            found = _find_module(named, mod_name)
            p = getattr(named[found], attr, None) if found is not None else None
            if not isinstance(p, torch.Tensor) or p.shape != value.shape:
                plan.unmatched.append(
                    f"{pname}: no norm weight of shape {tuple(value.shape)} in {type(module).__name__}")
                continue
            plan.norms.append((f"{found}.{attr}", named[found], value))
    return plan


def widen_linear_input(module: nn.Module, new_in: int) -> nn.Parameter:
    """Give a linear layer `new_in` input features; the new input columns are zero. Returns the old weight."""
    old = module.weight
    if new_in < old.shape[1]:
        raise ValueError(f"cannot narrow a linear layer from {old.shape[1]} to {new_in} inputs")
    w = torch.zeros(old.shape[0], new_in, dtype=old.dtype, device=old.device)
    with torch.no_grad():
        w[:, : old.shape[1]] = old
    module.weight = nn.Parameter(w, requires_grad=old.requires_grad)
    if hasattr(module, "in_features"):
        module.in_features = new_in
    return old


@torch.no_grad()
def _merge(sub: nn.Module, lw: LoRAWeights, strength: float) -> None:
    w = sub.weight
    s = strength * lw.scale
    add_to_weight(sub, s * (lw.up.to(w.device, torch.float32) @ lw.down.to(w.device, torch.float32)))
    if lw.bias_up is not None:
        b = sub.bias
        b.copy_((b.float() + s * lw.bias_up.to(b.device, torch.float32)).to(b.dtype))


def _lora_hook(sub: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    for a in getattr(sub, _ADAPTERS):
        if a.down.device != x.device:
            a.to_(x.device)
        h = F.linear(x.to(a.down.dtype), a.down)
        output = output + (a.weight * F.linear(h, a.up, a.bias)).to(output.dtype)
    return output


def _attach(sub: nn.Module, lw: LoRAWeights, strength: float) -> None:
    device, dtype = compute_spec(sub)  # a cast layer computes in another dtype/device than it stores
    dtype = dtype if dtype in _MERGEABLE else torch.bfloat16
    device = device if device.type != "meta" else lw.down.device
    adapter = _HotLoRA(lw.down.to(device, dtype), lw.up.to(device, dtype),
                       None if lw.bias_up is None else lw.bias_up.to(device, dtype), strength * lw.scale)
    if getattr(sub, _HOOK, None) is None:
        setattr(sub, _ADAPTERS, [])
        setattr(sub, _HOOK, sub.register_forward_hook(_lora_hook, with_kwargs=True))
    getattr(sub, _ADAPTERS).append(adapter)


def _execute(plan: _Plan, strength: float, hotload: bool, report: LoRAReport, prefix: str = "") -> None:
    for name, sub, lw in plan.layers:
        if lw.down.shape[1] > _weight_shape(sub)[1]:
            old = widen_linear_input(sub, lw.down.shape[1])
            if hotload and getattr(sub, _SAVED_INPUT, None) is None:
                setattr(sub, _SAVED_INPUT, (old, old.shape[1]))
            report.widened.append(prefix + name)
        (_attach if hotload else _merge)(sub, lw, strength)
        report.applied.append(prefix + name)
    for pname, sub, value in plan.norms:
        attr = pname.rpartition(".")[2]
        p = getattr(sub, attr)
        with torch.no_grad():
            if hotload:
                saved = getattr(sub, _SAVED_WEIGHT, None) or {}
                saved.setdefault(attr, p.detach().clone())
                setattr(sub, _SAVED_WEIGHT, saved)
            p.copy_(value.to(p.device, p.dtype))
        report.norms.append(prefix + pname)


def _listing(items, limit: int = 40) -> str:
    lines = [f"{k}: {v}" for k, v in items.items()] if isinstance(items, Mapping) else list(items)
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "".join(f"\n  {line}" for line in lines[:limit]) + more


def _check(problems: list[str], strict: bool, report: LoRAReport) -> None:
    if not problems:
        return
    msg = f"{len(problems)} LoRA entries match no layer of the model:" + _listing(problems)
    if strict:
        raise ValueError(msg + "\n(pass strict=False to apply the rest)")
    warnings.warn(msg + "\n(strict=False: applying the rest)", stacklevel=3)
    report.skipped.extend(problems)


def _mlp_ratio(module: nn.Module) -> float:
    return float(getattr(getattr(module, "config", None), "mlp_ratio", 4.0))


def apply_lora(module: nn.Module, lora, alpha: float = 1.0, hotload: bool = False,
               strict: bool = True) -> LoRAReport:
    """Apply the DiT part of `lora` (canonical, state dict or path) to `module` at strength `alpha`.

    Merge (default): ``W += alpha * scale * up @ down`` in fp32, written back in the weight's dtype.
    `hotload=True`: base weights stay untouched; a forward hook adds ``alpha * scale * up(down(x))``,
    several LoRAs stack, and `clear_lora` restores the module bit for bit. Norm replacements and a
    widened ``x_embedder`` (BFL Control-LoRA) are applied in both modes. Anything that matches no layer
    raises ValueError listing it before the model is touched (`strict=False`: warn and apply the rest).
    Text-encoder layers are not applied here: use `load_lora_into_pipeline` or
    ``apply_lora(text_encoder, lora.text_encoder_part())``.
    """
    lora = _as_canonical(lora, _mlp_ratio(module))
    report = LoRAReport("hotload" if hotload else "merge")
    plan = _plan(module, lora, merge=not hotload)
    _check([f"{k}: {v}" for k, v in lora.unknown.items()] + plan.unmatched, strict, report)
    if lora.te_layers:
        warnings.warn(f"{len(lora.te_layers)} text-encoder LoRA layers not applied by apply_lora "
                      "(use load_lora_into_pipeline)", stacklevel=2)
    _execute(plan, alpha, hotload, report)
    return report


def load_lora_into_pipeline(pipe, module: nn.Module, lora, alpha: float = 1.0, hotload: bool = False,
                            strict: bool = True) -> LoRAReport:
    """`FluxImagePipeline.load_lora`: DiT layers go to `module`, CLIP layers to ``pipe.text_encoder_1``.

    `lora` is a file path (safetensors / torch file), a state dict or a `CanonicalLoRA`. Everything is
    matched first; with `strict`, any unmatched entry raises ValueError and nothing is applied.
    """
    lora = _as_canonical(lora, _mlp_ratio(module))
    report = LoRAReport("hotload" if hotload else "merge")
    dit_plan = _plan(module, lora, merge=not hotload)
    problems = [f"{k}: {v}" for k, v in lora.unknown.items()] + dit_plan.unmatched
    te_plan = None
    if lora.te_layers:
        te = getattr(pipe, "text_encoder_1", None)
        if te is None:
            problems += [f"{', '.join(lw.source) or n} -> {n}: the pipeline has no text_encoder_1 (CLIP) loaded"
                         for n, lw in lora.te_layers.items()]
        else:
            te_plan = _plan(te, lora, merge=not hotload, layers=lora.te_layers)
            problems += te_plan.unmatched
    _check(problems, strict, report)
    _execute(dit_plan, alpha, hotload, report)
    if te_plan is not None:
        _execute(te_plan, alpha, hotload, report, prefix="text_encoder_1.")
    return report


def clear_lora(module: nn.Module) -> None:
    """Remove every hot-loaded LoRA from `module` and undo its norm replacements and input widening.

    Merged LoRAs are part of the weights and stay.
    """
    for sub in module.modules():
        handle = getattr(sub, _HOOK, None)
        if handle is not None:
            handle.remove()
            delattr(sub, _HOOK)
            delattr(sub, _ADAPTERS)
        saved = getattr(sub, _SAVED_WEIGHT, None)
        if saved is not None:
            with torch.no_grad():
                for attr, value in saved.items():
                    getattr(sub, attr).copy_(value)
            delattr(sub, _SAVED_WEIGHT)
        saved_input = getattr(sub, _SAVED_INPUT, None)
        if saved_input is not None:
            sub.weight, in_features = saved_input
            if hasattr(sub, "in_features"):
                sub.in_features = in_features
            delattr(sub, _SAVED_INPUT)


# ----------------------------------------------------------------------------- export

def export_kohya(lora: CanonicalLoRA, strict: bool = True) -> dict[str, torch.Tensor]:
    """kohya / sd-scripts names (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``lora_te1_*``).

    Weights are written unchanged with each layer's own ``.alpha`` (the rank when it had none), so
    reading the file back gives the same LoRA exactly. Final-layer LoRAs get their scale folded into
    ``lora_up`` and alpha = rank, because diffusers ignores alpha there. LoRA biases and norm weights
    have no kohya form: ValueError (`strict=False`: warn and leave them out).
    """
    out: dict[str, torch.Tensor] = {}
    problems = [f"{n}: norm weights have no kohya form" for n in lora.norm_weights]

    def put(key: str, lw: LoRAWeights, up: torch.Tensor, alpha: float | None) -> None:
        out[f"{key}.lora_down.weight"] = lw.down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(lw.rank if alpha is None else alpha))

    for name, lw in lora.layers.items():
        bfl = internal_key_to_bfl(name + ".weight")
        if bfl is None or lw.bias_up is not None:
            problems.append(f"{name}: " + ("no BFL name" if bfl is None else "LoRA bias has no kohya form"))
            continue
        up, alpha = lw.up, lw.alpha
        if name.startswith("final_") and lw.scale != 1.0:
            up, alpha = (up.float() * lw.scale).to(up.dtype), None
        if name == "final_norm_out.linear":
            up = _swap_halves(up)
        put("lora_unet_" + bfl[: -len(".weight")].replace(".", "_"), lw, up, alpha)
    for name, lw in lora.te_layers.items():
        if lw.bias_up is not None:
            problems.append(f"{name}: LoRA bias has no kohya form")
            continue
        put("lora_te1_" + name.replace(".", "_"), lw, lw.up, lw.alpha)
    if problems:
        msg = "cannot export to kohya format:" + _listing(problems)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    return out


_INTERNAL_TO_DIFFUSERS_TOP = {v: k for k, v in _DIFFUSERS_TOP.items()}
_INTERNAL_TO_DIFFUSERS_BLOCK = {
    "blocks": ("transformer_blocks", {v: k for k, v in _DIFFUSERS_DOUBLE.items()}),
    "single_blocks": ("single_transformer_blocks", {v: k for k, v in _DIFFUSERS_SINGLE.items()}),
}


def _to_diffusers_name(name: str) -> str | None:
    """Internal module name -> diffusers module name (None for fused layers and unknown names)."""
    m = re.fullmatch(r"(blocks|single_blocks)\.(\d+)\.(.+)", name)
    if not m:
        return _INTERNAL_TO_DIFFUSERS_TOP.get(name)
    kind, table = _INTERNAL_TO_DIFFUSERS_BLOCK[m.group(1)]
    rest = table.get(m.group(3))
    return f"{kind}.{m.group(2)}.{rest}" if rest else None


def _diffusers_pieces(name: str, lw: LoRAWeights):
    """(diffusers module, down, up, bias) for one internal layer; fused layers split exactly by rows.

    Each part keeps only the rank columns its rows use (a block-diagonal fused LoRA splits back into its
    original parts); a part whose rows are all zero is left out.
    """
    m = re.fullmatch(r"(blocks|single_blocks)\.(\d+)\.(.+)", name)
    kind = {"blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}[m.group(1)] if m else None
    parts = _DIFFUSERS_FUSED.get((kind, m.group(3))) if m else None
    if parts is None:
        path = _to_diffusers_name(name)
        if path is None:
            raise ValueError(f"cannot export {name!r} to diffusers names")
        yield path, lw.down, lw.up, lw.bias_up
        return
    hidden = lw.down.shape[1]
    sizes = [hidden] * 3 + ([lw.up.shape[0] - 3 * hidden] if len(parts) == 4 else [])
    start = 0
    for part, size in zip(parts, sizes):
        rows = slice(start, start + size)
        start += size
        up, bias = lw.up[rows], None if lw.bias_up is None else lw.bias_up[rows]
        cols = (up != 0).any(dim=0)
        if not cols.any() and (bias is None or not bias.any()):
            continue
        if cols.any():
            up, down = up[:, cols], lw.down[cols]
        else:
            down = lw.down
        yield f"{kind}.{m.group(2)}.{part}", down.contiguous(), up.contiguous(), bias


def _bake(t: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    return t if t is None or scale == 1.0 else (t.float() * scale).to(t.dtype)


def _peft_config(ranks: dict[str, int], bias: bool) -> dict:
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{path}": rank for path, rank in ranks.items() if rank != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "lora_bias": bias, "use_dora": False}


def export_peft(lora: CanonicalLoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers / PEFT format: ``transformer.<diffusers path>.lora_A.weight`` (+ ``text_encoder.*``).

    Each layer's alpha/rank is baked into ``lora_B`` so that alpha = rank everywhere, and the header
    metadata ``{"lora_adapter_metadata": json}`` carries the LoraConfig (r, lora_alpha, rank/alpha
    patterns, target_modules) per component, as diffusers' ``save_lora_weights`` writes it.
    """
    sd: dict[str, torch.Tensor] = {}
    config: dict[str, object] = {}
    for comp, layers in (("transformer", lora.layers), ("text_encoder", lora.te_layers)):
        ranks: dict[str, int] = {}
        bias = False
        for name, lw in layers.items():
            pieces = _diffusers_pieces(name, lw) if comp == "transformer" else [(name, lw.down, lw.up, lw.bias_up)]
            for path, down, up, b in pieces:
                sd[f"{comp}.{path}.lora_A.weight"] = down
                sd[f"{comp}.{path}.lora_B.weight"] = _bake(up, lw.scale)
                if b is not None:
                    sd[f"{comp}.{path}.lora_B.bias"] = _bake(b, lw.scale)
                    bias = True
                ranks[path] = down.shape[0]
        if ranks:
            config.update({f"{comp}.{k}": v for k, v in _peft_config(ranks, bias).items()})
    for pname, value in lora.norm_weights.items():
        path = _to_diffusers_name(pname.rpartition(".")[0])
        if path is None:
            raise ValueError(f"cannot export norm weight {pname!r} to diffusers names")
        sd[f"transformer.{path}.weight"] = value
    return sd, {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def save_lora(path: str | os.PathLike, sd: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write a LoRA state dict to a safetensors file atomically."""
    from .loading import save_safetensors
    save_safetensors(dict(sd), path, dict(metadata) if metadata else None)


# ----------------------------------------------------------------------------- inspection

def describe_lora(path_or_sd, model: nn.Module | object | None = None) -> dict:
    """What a LoRA file is: dialect, ranks, alphas, targeted layers, and what would not apply.

    `model` (a FluxDiT, any nn.Module, or a FluxDiTConfig) adds ``not_applied``: the entries that
    `apply_lora` would reject for that model. A config is instantiated on the meta device (no memory).
    """
    if isinstance(path_or_sd, Mapping):
        sd, metadata, name = dict(path_or_sd), {}, None
    else:
        sd, metadata = read_lora_file(path_or_sd)
        name = str(path_or_sd)
    ratio = _mlp_ratio(model) if isinstance(model, nn.Module) else float(getattr(model, "mlp_ratio", 4.0))
    lora = convert_lora(sd, metadata, ratio)
    every = {**lora.layers, **{f"text_encoder.{k}": v for k, v in lora.te_layers.items()}}
    info = {
        "file": name,
        "dialect": lora.dialect,
        "tensors": len(sd),
        "num_layers": len(lora.layers),
        "num_te_layers": len(lora.te_layers),
        "layers": sorted(every),
        "ranks": Counter(lw.rank for lw in every.values()),
        "alphas": Counter("none" if lw.alpha is None else lw.alpha for lw in every.values()),
        "norm_weights": sorted(lora.norm_weights),
        "bias": sorted(k for k, lw in every.items() if lw.bias_up is not None),
        "dtypes": Counter(str(t.dtype).replace("torch.", "") for t in sd.values()),
        "unknown": dict(lora.unknown),
    }
    if model is not None:
        if not isinstance(model, nn.Module):
            from ..models.flux_dit import FluxDiT
            with torch.device("meta"):
                model = FluxDiT(model)
        plan = _plan(model, lora, merge=False)
        info["not_applied"] = [f"{k}: {v}" for k, v in lora.unknown.items()] + plan.unmatched
    return info
