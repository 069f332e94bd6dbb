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
from torch import nn

from ...models.flux_dit import swap_halves
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
    family: str = "flux"  # the DiT naming its layer names are in: "flux" (FLUX.1) or "flux2"

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
class DiTNaming:
    """The key names of one DiT family (FLUX.1, FLUX.2) in every naming LoRA files use, as data.

    Block tables are keyed by the BFL / diffusers block list (``double_blocks``, ``transformer_blocks``, ...)
    and map module names inside a block (BFL tables map parameter keys, as in the model files).
    """
    family: str
    bfl_key_to_internal: Callable[[str], str | None]
    internal_key_to_bfl: Callable[[str], str | None]
    bfl_top: Mapping[str, str]
    bfl_blocks: Mapping[str, tuple[str, Mapping[str, str]]]  # BFL list -> (internal list, table)
    diffusers_top: Mapping[str, str]
    diffusers_blocks: Mapping[str, tuple[str, Mapping[str, str]]]  # diffusers list -> (internal list, table)
    # internal fused layer inside a block -> the diffusers modules it concatenates (FLUX.1's q/k/v[/mlp])
    diffusers_fused: Mapping[tuple[str, str], tuple[str, ...]]
    # BFL fused module inside a block -> the internal layers it splits into, equal row groups (FLUX.2's q/k/v)
    bfl_split: Mapping[str, tuple[str, ...]]
    fused_rows: Callable[[str, int, float], list[int] | None]  # fused layer suffix, hidden, mlp ratio -> rows
    norm_param: re.Pattern  # internal norm parameters (replaced whole, never LoRA targets)
    final_layers: tuple[str, ...]  # internal final layers, the first one stored (shift, scale) by BFL
    xlabs: Mapping[str, str] = field(default_factory=dict)  # XLabs processor name -> BFL module
    comfy_partial: Mapping[str, tuple[str, tuple[int, int]]] = field(default_factory=dict)  # -> (fused, parts)

    @property
    def internal_blocks(self) -> dict[str, set[str]]:
        """Internal block list -> the module names inside a block."""
        out: dict[str, set[str]] = {}
        for kind, (internal, table) in self.bfl_blocks.items():
            names = {v for v in table.values()} | {p for parts in self.bfl_split.values() for p in parts}
            out[internal] = names if kind == "double_blocks" else set(table.values())
        return out

    @property
    def kohya_blocks(self) -> dict[str, dict[str, str]]:
        """BFL module names with ``_`` for ``.``, as kohya writes them after ``lora_unet_<list>_<N>_``."""
        out = {}
        for kind, (_, table) in self.bfl_blocks.items():
            names = [k for k in table if not k.endswith(".scale")] + (list(self.bfl_split) if kind == "double_blocks"
                                                                      else [])
            out[kind] = {k.replace(".", "_"): k for k in names} | {k: k for k in self.comfy_partial}
        return out

    @property
    def diffusers_parts(self) -> dict[tuple[str, str], tuple[str, int]]:
        return {(kind, part): (fused, i) for (kind, fused), parts in self.diffusers_fused.items()
                for i, part in enumerate(parts)}


def _flux1_rows(suffix: str, hidden: int, mlp_ratio: float) -> list[int] | None:
    parts = {"attn.a_to_qkv": 3, "attn.b_to_qkv": 3, "to_qkv_mlp": 4}.get(suffix)
    return None if parts is None else [hidden] * 3 + ([int(hidden * mlp_ratio)] if parts == 4 else [])


def _identity(names) -> dict[str, str]:
    return {n: n for n in names}


def _flux1_naming() -> DiTNaming:
    from ...models import flux_dit as m
    return DiTNaming(
        "flux", m.bfl_key_to_internal, m.internal_key_to_bfl, m.BFL_TOP,
        {"double_blocks": ("blocks", m.BFL_DOUBLE), "single_blocks": ("single_blocks", m.BFL_SINGLE)},
        m.DIFFUSERS_TOP,
        {"transformer_blocks": ("blocks", m.DIFFUSERS_DOUBLE),
         "single_transformer_blocks": ("single_blocks", m.DIFFUSERS_SINGLE)},
        m.DIFFUSERS_FUSED, {}, _flux1_rows, re.compile(r"(.*\.)?norm_[qk]_[ab]\.weight"),
        ("final_norm_out.linear", "final_proj_out"),
        xlabs={"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
               "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1_qkv", "proj_lora": "linear2"},
        # ComfyUI's name for the first 3*hidden rows (q/k/v) of single-block linear1
        comfy_partial={"linear1_qkv": ("to_qkv_mlp", (0, 3))})


def _flux2_naming() -> DiTNaming:
    """FLUX.2's internal names are diffusers' own: its diffusers tables are the identity."""
    from ...models import flux2_dit as m
    double = {v.removesuffix(".weight"): v.removesuffix(".weight") for v in m.BFL_DOUBLE.values()}
    double |= _identity(p for parts in m.BFL_FUSED.values() for p in parts)
    single = _identity(v.removesuffix(".weight") for v in m.BFL_SINGLE.values())
    return DiTNaming(
        "flux2", m.bfl_key_to_internal, m.internal_key_to_bfl, m.BFL_TOP,
        {"double_blocks": ("transformer_blocks", m.BFL_DOUBLE),
         "single_blocks": ("single_transformer_blocks", m.BFL_SINGLE)},
        _identity(m.BFL_TOP.values()),
        {"transformer_blocks": ("transformer_blocks", double),
         "single_transformer_blocks": ("single_transformer_blocks", single)},
        {}, m.BFL_FUSED, lambda suffix, hidden, ratio: None,
        re.compile(r"(.*\.)?norm_(added_)?[qk]\.weight"), ("norm_out.linear", "proj_out"))


FLUX1, FLUX2 = _flux1_naming(), _flux2_naming()
NAMINGS = {n.family: n for n in (FLUX1, FLUX2)}


def naming_for(model) -> DiTNaming:
    """The naming of a DiT module or config: FLUX.2's for `Flux2DiT` / `Flux2DiTConfig`, FLUX.1's otherwise."""
    from ...models.flux2_dit import Flux2DiT, Flux2DiTConfig
    if isinstance(model, nn.Module):  # also a wrapper holding the DiT (a training module)
        return FLUX2 if any(isinstance(m, Flux2DiT) for m in model.modules()) else FLUX1
    return FLUX2 if isinstance(model, Flux2DiTConfig) else FLUX1


@dataclass(frozen=True)
class Target:
    space: str  # "dit" or "te"
    name: str  # internal module name / CLIP module name
    parts: tuple[int, int] | None = None  # [first, last) part of a fused layer; None: the whole layer
    swap: bool = False  # BFL final modulation: (shift, scale) rows -> (scale, shift)
    split: tuple[str, ...] = ()  # one fused LoRA for these internal layers, equal row groups in order


_CLIP_SUB = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
             "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
             "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}


def _bfl_target(path: str, n: DiTNaming) -> Target | None:
    """A BFL module name (``double_blocks.0.img_attn.qkv``) as a target."""
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", path)
    if m and m.group(1) in n.bfl_blocks:
        kind, idx, rest = m.groups()
        block = f"{n.bfl_blocks[kind][0]}.{idx}."
        if rest in n.comfy_partial:
            fused, parts = n.comfy_partial[rest]
            return Target("dit", block + fused, parts=parts)
        if rest in n.bfl_split and kind == "double_blocks":
            return Target("dit", block + n.bfl_split[rest][0], split=tuple(block + p for p in n.bfl_split[rest]))
    name = n.bfl_key_to_internal(path + ".weight")
    if name is None or not name.endswith(".weight") or n.norm_param.fullmatch(name):
        return None
    name = name[: -len(".weight")]
    return Target("dit", name, swap=name == n.final_layers[0])


def _kohya_target(name: str, n: DiTNaming) -> Target | None:
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(\w+)", name)
    if m:
        kind, idx, rest = m.groups()
        bfl = n.kohya_blocks[kind].get(rest)
        return _bfl_target(f"{kind}.{idx}.{bfl}", n) if bfl else None
    top = {k.replace(".", "_"): k for k in n.bfl_top}
    return _bfl_target(top[name], n) if name in top else None


def _diffusers_module(path: str, n: DiTNaming) -> Target | None:
    """A diffusers module name (linear or norm) as a target."""
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if m:
        kind, idx, rest = m.groups()
        internal, table = n.diffusers_blocks[kind]
        block = f"{internal}.{idx}."
        if (kind, rest) in n.diffusers_parts:
            fused, i = n.diffusers_parts[kind, rest]
            return Target("dit", block + fused, parts=(i, i + 1))
        name = table.get(rest)
        return Target("dit", block + name) if name else None
    return Target("dit", n.diffusers_top[path]) if path in n.diffusers_top else None


def _diffusers_target(path: str, n: DiTNaming) -> Target | None:
    t = _diffusers_module(path, n)
    return None if t is None or n.norm_param.fullmatch(t.name + ".weight") else t


def _onetrainer_target(name: str, n: DiTNaming) -> Target | None:
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)_(\d+)_(\w+)", name)
    if m:
        kind, idx, rest = m.groups()
        names = [*n.diffusers_blocks[kind][1], *(p for (k, p) in n.diffusers_parts if k == kind)]
        path = {x.replace(".", "_"): x for x in names}.get(rest)
        return _diffusers_target(f"{kind}.{idx}.{path}", n) if path else None
    top = {k.replace(".", "_"): k for k in n.diffusers_top}
    return _diffusers_target(top[name], n) if name in top else None


def _internal_target(name: str, n: DiTNaming) -> Target | None:
    blocks = n.internal_blocks
    m = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", name)
    ok = m.group(3) in blocks[m.group(1)] if m and m.group(1) in blocks else name in set(n.bfl_top.values())
    return Target("dit", name) if ok else None


def _xlabs_target(path: str, n: DiTNaming) -> Target | None:
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)", path)
    if not m or m.group(3) not in n.xlabs:
        return None
    return _bfl_target(f"{m.group(1)}.{m.group(2)}.{n.xlabs[m.group(3)]}", n)


def _clip_target(name: str, n: DiTNaming) -> Target | None:
    m = re.fullmatch(r"(?:text_model[._])?encoder[._]layers[._](\d+)[._](.+)", name)
    sub = _CLIP_SUB.get(m.group(2).replace(".", "_")) if m else None
    return Target("te", f"text_model.encoder.layers.{m.group(1)}.{sub}") if sub else None


def _dit_path_target(path: str, n: DiTNaming) -> Target | None:
    return _xlabs_target(path, n) or _bfl_target(path, n) or _diffusers_target(path, n) or _internal_target(path, n)


_DIT_PREFIXES = ("pipe.dit.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_PREFIXED: tuple[tuple[str, Callable[[str, DiTNaming], Target | None]], ...] = (
    ("lora_unet_", _kohya_target), ("lora_transformer_", _onetrainer_target),
    ("lora_te1_", _clip_target), ("lora_te_", _clip_target),
    ("text_encoders.clip_l.transformer.", _clip_target), ("text_encoder.", _clip_target),
    *((p, _dit_path_target) for p in _DIT_PREFIXES),
)


def _resolve(stem: str, n: DiTNaming) -> Target | None:
    """Where the LoRA pair named `stem` (key without ``.lora_down.weight`` etc.) goes; None: unknown."""
    for prefix, fn in _PREFIXED:
        if stem.startswith(prefix):
            return fn(stem[len(prefix):], n)
    return _dit_path_target(stem, n)


def _resolve_norm(key: str, n: DiTNaming) -> str | None:
    """A full (non-LoRA) tensor: the internal norm parameter it replaces, or None."""
    for p in _DIT_PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
            break
    name = n.bfl_key_to_internal(key)
    if name is None and key.endswith(".weight"):
        t = _diffusers_module(key[: -len(".weight")], n) or _internal_target(key, n)
        name = t and (t.name if t.name.endswith(".weight") else t.name + ".weight")
    return name if name and n.norm_param.fullmatch(name) else None


def key_listing(items, limit: int = 40) -> str:
    lines = [f"{k}: {v}" for k, v in items.items()] if isinstance(items, Mapping) else list(items)
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "".join(f"\n  {line}" for line in lines[:limit]) + more


# ----------------------------------------------------------------------------- dialect detection

def detect_dialect(sd: Mapping[str, object], naming: DiTNaming | None = None) -> str:
    """Name of the LoRA file dialect of `sd` (see the module docstring); "unknown" if none fits.
    `naming` (FLUX.1's by default) decides bare names."""
    naming = naming or FLUX1
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
                                           ("diffsynth", _internal_target)) if fn(stem, naming))
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


def fuse_parts(name: str, pieces: list[tuple[Target, LoRAWeights]], sizes: list[int] | None,
          unknown: dict[str, str]) -> LoRAWeights | None:
    """Fuse LoRAs of parts of a fused layer (q, k, v [, mlp]; row counts `sizes`) into one exact block LoRA."""
    if sizes is None:
        for _, lw in pieces:
            unknown.update({s: f"{name} is not a fused layer" for s in lw.source})
        return None
    n_parts, hidden = len(sizes), pieces[0][1].down.shape[1]
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
                 mlp_ratio: float = 4.0, naming: DiTNaming | None = None) -> CanonicalLoRA:
    """Read a LoRA state dict of any supported dialect into the canonical form.

    `metadata` is the safetensors header (diffusers stores ``lora_alpha`` there). `mlp_ratio` sizes the
    MLP rows of single-block ``to_qkv_mlp`` when only its q/k/v part is given. `naming` is the target
    DiT family's (`naming_for(dit)`; FLUX.1's by default). Keys that cannot be converted are kept in
    ``.unknown`` (key -> reason); `apply_lora` reports them. DoRA and LyCORIS files raise ValueError.
    """
    naming = naming or FLUX1
    keys = list(sd)
    _reject_unsupported(keys)
    alpha_of = _peft_alpha_lookup(metadata)
    lora = CanonicalLoRA(dialect=detect_dialect(sd, naming), family=naming.family)
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for k in keys:
        stem, role = _split_key(k)
        if role == "full":
            name = _resolve_norm(k, naming)
            if name is None:
                lora.unknown[k] = "not a LoRA tensor and not a known norm weight"
            else:
                lora.norm_weights[name] = sd[k]
            continue
        stems.setdefault(stem, {})[role] = sd[k]

    grouped: dict[tuple[str, str], list[tuple[Target, LoRAWeights]]] = {}
    for stem, parts in stems.items():
        if "down" not in parts or "up" not in parts:
            lora.unknown[stem] = f"incomplete LoRA pair (has only {sorted(parts)})"
            continue
        target = _resolve(stem, naming)
        if target is None:
            lora.unknown[stem] = f"no matching {naming.family.upper()} DiT or CLIP layer name"
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
            up = swap_halves(up)
            bias = None if bias is None else swap_halves(bias)
        if target.split and up.shape[0] % len(target.split):
            lora.unknown[stem] = f"{up.shape[0]} rows do not split into {len(target.split)} equal layers"
            continue
        for t, lw in _split(target, LoRAWeights(down, up, alpha, bias, (stem,))):
            grouped.setdefault((t.space, t.name), []).append((t, lw))

    for (space, name), pieces in grouped.items():
        whole = [p for p in pieces if p[0].parts is None]
        if len(pieces) == 1 and whole:
            lw = whole[0][1]
        elif whole and len(whole) == len(pieces):
            lora.unknown.update({s: f"several LoRAs for {name}" for _, lw in pieces for s in lw.source})
            continue
        else:
            hidden = pieces[0][1].down.shape[1]
            lw = fuse_parts(name, pieces, naming.fused_rows(name.split(".", 2)[-1], hidden, mlp_ratio), lora.unknown)
            if lw is None:
                continue
        (lora.layers if space == "dit" else lora.te_layers)[name] = lw
    return lora


def _split(target: Target, lw: LoRAWeights) -> list[tuple[Target, LoRAWeights]]:
    """A LoRA of a fused BFL layer as exact LoRAs of the separate layers it feeds (shared down, row groups of up)."""
    if not target.split:
        return [(target, lw)]
    n = len(target.split)
    ups = lw.up.chunk(n, dim=0)
    biases = (None,) * n if lw.bias_up is None else lw.bias_up.chunk(n, dim=0)
    return [(Target(target.space, name), LoRAWeights(lw.down, up.contiguous(), lw.alpha, bias, lw.source))
            for name, up, bias in zip(target.split, ups, biases)]


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


def lora_from_peft_model_state(sd: Mapping[str, torch.Tensor], lora_alpha: float | None = None,
                               naming: DiTNaming | None = None) -> CanonicalLoRA:
    """Our training output (internal names, ``lora_A.default.weight``) -> canonical; raises on stray keys.

    `lora_alpha` is the PEFT ``LoraConfig.lora_alpha`` used in training (None: alpha = rank); `naming` the
    trained DiT's (`naming_for(dit)`; FLUX.1's by default).
    """
    lora = convert_lora(sd, naming=naming)
    if lora.unknown:
        raise ValueError(f"not a {lora.family.upper()} DiT LoRA state dict: " + key_listing(lora.unknown))
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


def as_canonical(lora, mlp_ratio: float = 4.0, naming: DiTNaming | None = None) -> CanonicalLoRA:
    naming = naming or FLUX1
    if isinstance(lora, CanonicalLoRA):
        if lora.family != naming.family and lora.layers:
            raise ValueError(f"this LoRA was read for a {lora.family} DiT, not a {naming.family} one: "
                             "convert it with convert_lora(..., naming=naming_for(dit))")
        return lora
    lora = _resolve_config(lora)
    if isinstance(lora, (str, os.PathLike)):
        sd, metadata = read_lora_file(lora)
        return _not_empty(convert_lora(sd, metadata, mlp_ratio, naming), str(lora))
    if isinstance(lora, Mapping):
        return _not_empty(convert_lora(lora, mlp_ratio=mlp_ratio, naming=naming), "the LoRA state dict")
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
