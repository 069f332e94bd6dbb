"""FluxTrainingModule: the pipeline plus what is trained (full models and/or a PEFT LoRA) and the loss.

The module holds the pipeline as `self.pipe`, so parameter names read `pipe.dit.*` and DiffSynth-Studio's
`--remove_prefix_in_ckpt pipe.dit.` strips exactly that. Inputs are prepared by the pipeline's own
units (the ones inference runs), so training sees the same latents, embeddings and ids as generation.
"""
from __future__ import annotations

import contextlib
import re
from typing import Sequence

import torch
from torch import nn

from ..loading import components as table
from ..pipelines.checks import check_known_inputs
from ..pipelines.units import StepUnit, Unit, active_units, run_units
from ..schedulers.flow_match import add_noise, training_target
from .schedule import SigmaSampler, grid_sampler


def model_name(name: str) -> str:
    return table.ALIASES.get(name, name)


def pipeline_model(pipe, name: str) -> nn.Module:
    """`pipe.<name>` (a trainable component of the table), with a clear error for unknown or unloaded names."""
    name = model_name(name)
    known = name in table.COMPONENT_BY_NAME and table.COMPONENT_BY_NAME[name].trainable
    model = getattr(pipe, name, None) if known else None
    if not isinstance(model, nn.Module) or (isinstance(model, nn.ModuleList) and not len(model)):
        loaded = list(pipe.loaded_models())
        why = "is not loaded" if known else "is not a trainable model of the pipeline"
        raise ValueError(f"{name!r} {why}; loaded models: {', '.join(loaded)}")
    return model


def stack_samples(items: list[dict], units: list[Unit]) -> dict:
    """One batch from prepared samples: what the units declare per-sample (`Unit.per_sample`) is stacked
    (tensors along their batch dimension of 1, structured values through their `stack`); every other model
    input is shared by the batch and must be the same in every sample (else the batch would silently train
    on the first sample's)."""
    out = dict(items[0])
    if len(items) == 1:
        return out
    stacked = {k for u in units for k in u.per_sample}
    shared = {k for u in units for k in u.model_inputs} - stacked
    for k, v in items[0].items():
        values = [x.get(k) for x in items]
        if k in stacked and isinstance(v, torch.Tensor):
            shapes = {tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in values}
            if len(shapes) != 1 or v.shape[0] != 1:
                raise ValueError(f"{k} cannot be stacked into a training batch: its shapes differ ({sorted(map(str, shapes))}); "
                                 "use --batch_size 1 or rows whose inputs have one size")
            out[k] = torch.cat(values)
        elif k in stacked and hasattr(v, "stack"):  # structured model inputs (ControlNet conditions)
            out[k] = type(v).stack(values)
        elif k in shared and not all(_same(v, x) for x in values[1:]):
            raise ValueError(f"{k} differs between the samples of one training batch but is shared by the batch: "
                             "use --batch_size 1, or give the rows of a batch the same value")
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def cached_keys(units: list[Unit]) -> tuple[str, ...]:
    """What a training cache stores: the cacheable outputs of the units."""
    return tuple(k for u in units for k in u.cacheable)


def short_linear_names(model: nn.Module) -> list[str]:
    """Linear layer names with block indices dropped: the names --lora_target_modules accepts."""
    names = {re.sub(r"^(.*\.)?\d+\.", "", n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


def add_lora(model: nn.Module, targets: Sequence[str], rank: int) -> None:
    """PEFT LoRA (adapter "default", lora_alpha = rank, so scale 1) on every linear named by `targets`.

    LoRA weights are kept in fp32 whatever the base dtype (PEFT casts inputs to the adapter dtype).
    """
    from peft import LoraConfig, inject_adapter_in_model
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
    if missing:
        raise ValueError(f"--lora_target_modules {missing} match no linear layer; valid names: "
                         f"{', '.join(short_linear_names(model))}")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def load_lora_checkpoint(model: nn.Module, path: str, rank: int, is_dit: bool) -> int:
    """Warm-start the injected LoRA from a file (our format, PEFT, or any dialect loading.lora reads for a DiT).

    Returns how many layers were loaded; raises when a layer is unknown, not targeted, or of another rank.
    """
    from ..loading.lora import convert_lora, naming_for, read_lora_file
    sd, metadata = read_lora_file(path)
    state = {}
    if is_dit:
        lora = convert_lora(sd, metadata, float(getattr(model.config, "mlp_ratio", 4.0)), naming_for(model))
        if lora.unknown or lora.norm_weights or lora.te_layers:
            raise ValueError(f"--lora_checkpoint {path}: entries that are not DiT LoRA layers: "
                             f"{sorted([*lora.unknown, *lora.norm_weights, *lora.te_layers])[:10]}")
        for name, lw in lora.layers.items():
            if lw.bias_up is not None:
                raise ValueError(f"--lora_checkpoint {path}: {name} has a LoRA bias, which training does not use")
            state[f"{name}.lora_A.default.weight"] = lw.down
            state[f"{name}.lora_B.default.weight"] = lw.up.float() * lw.scale
    else:
        for k, v in sd.items():
            k = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            state[k] = v
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise ValueError(f"--lora_checkpoint {path}: {len(unknown)} tensors have no LoRA layer here "
                         f"(not in --lora_target_modules?): {unknown[:5]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in state.items()
             if v.shape != params[k].shape]
    if wrong:
        raise ValueError(f"--lora_checkpoint {path} does not fit --lora_rank {rank}: {wrong[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return len(state) // 2


class FluxTrainingModule(nn.Module):
    def __init__(self, pipe, trainable_models: Sequence[str] = (), lora_base_model: str | None = None,
                 lora_target_modules: Sequence[str] = (), lora_rank: int = 32, lora_checkpoint: str | None = None,
                 use_gradient_checkpointing: bool = False, use_gradient_checkpointing_offload: bool = False,
                 extra_inputs: Sequence[str] = (), guidance: float = 1.0, t5_sequence_length: int = 512,
                 sigma_sampler: SigmaSampler | None = None):
        super().__init__()
        self.pipe = pipe
        self.trainable_models = [model_name(n) for n in trainable_models]
        self.lora_base_model = model_name(lora_base_model) if lora_base_model else None
        self.extra_inputs = list(extra_inputs)
        self.guidance, self.t5_sequence_length = guidance, t5_sequence_length
        self.sigma_sampler = sigma_sampler or grid_sampler(pipe.training_sigmas())  # the family's grid
        self.offload_activations = use_gradient_checkpointing_offload
        self._check_extra_inputs()

        pipe.requires_grad_(False)
        pipe.eval()
        for name in self.trainable_models:
            pipeline_model(pipe, name).requires_grad_(True)
        if self.lora_base_model:
            base = pipeline_model(pipe, self.lora_base_model)
            add_lora(base, lora_target_modules, lora_rank)
            if lora_checkpoint:
                n = load_lora_checkpoint(base, lora_checkpoint, lora_rank, self.lora_base_model == "dit")
                print(f"loaded {n} LoRA layers from {lora_checkpoint}")
        if use_gradient_checkpointing or use_gradient_checkpointing_offload:
            pipe.dit.gradient_checkpointing = True
            for name in self.trained_models():
                model = getattr(pipe, name)
                if name != "dit" and hasattr(model, "gradient_checkpointing_enable"):
                    model.gradient_checkpointing_enable()
        if (self.trainable_models or self.lora_base_model) and not any(p.requires_grad for p in self.parameters()):
            raise ValueError("nothing to train: give --trainable_models and/or --lora_base_model")
        self.train()

    def trained_models(self) -> list[str]:
        return sorted({*self.trainable_models, *([self.lora_base_model] if self.lora_base_model else [])})

    def train(self, mode: bool = True) -> "FluxTrainingModule":
        """Only trained models switch mode; frozen encoders stay in eval (no dropout)."""
        self.training = mode
        for name in self.trained_models():
            getattr(self.pipe, name).train(mode)
        return self

    def _check_extra_inputs(self) -> None:
        check_known_inputs(self.extra_inputs, self.pipe.accepted_inputs(), "--extra_inputs")

    def preprocessing_is_trained(self, cached_only: bool = False) -> bool:
        """True when a model the units read (text encoders, VAE encoder, projectors) has trainable weights;
        `cached_only`: only the units whose outputs a training cache would store."""
        names = {m for u in self.units() if u.cacheable or not cached_only for m in u.reads}
        return any(p.requires_grad for n, m in self.pipe.loaded_models().items() if n.split(".")[0] in names
                   for p in m.parameters())

    def units(self) -> list[Unit]:
        return active_units(self.pipe, self.pipe.units)

    def models_unused_with_cache(self) -> list[str]:
        """Loaded models that neither the loop, the training, nor a unit still running over cached rows reads:
        they can be freed. The cache replaces the units with `cacheable` outputs; of the others, a unit acts
        only when it replaces core units (`active`) or takes one of the dataset's extra inputs or the output
        of a unit that acts (e.g. controlnet_image -> controlnet_inputs -> latents): the rest are no-ops."""
        in_loop = {c.name for c in table.COMPONENTS if c.in_loop}
        present, read = set(self.extra_inputs), set()
        for u in self.units():
            if not u.cacheable and (u.active is not None or present & set(u.params)):
                read |= set(u.reads)
                present |= set(u.outputs)
        keep = in_loop | read | set(self.trained_models())
        return sorted({n.split(".")[0] for n in self.pipe.loaded_models()} - keep)

    # -- inputs ------------------------------------------------------------------------------------
    def prepare_sample(self, item: dict, seed: int) -> dict:
        """One dataset item -> the model inputs the units produce (x0 as `input_latents`, `noise`, ...)."""
        shared = {"height": item["height"], "width": item["width"], "seed": seed, "rand_device": "cpu",
                  "embedded_guidance": self.guidance, "t5_sequence_length": self.t5_sequence_length,
                  "sigmas": torch.ones(1), "cfg_scale": 1.0, "tiled": False}
        shared.update({k: item[k] for k in self.extra_inputs})
        posi = {"prompt": item["prompt"]}
        units = self.units()
        if "cached" in item:
            cached = {k: v.to(self.pipe.device) for k, v in item["cached"].items()}
            shared["input_latents"] = cached.pop("input_latents")
            posi.update(cached)
            units = [u for u in units if not u.cacheable or not set(u.cacheable) <= set(item["cached"])]
        else:
            shared["input_image"] = item["image"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.preprocessing_is_trained()):
            run_units(self.pipe, units, shared, posi, {}, False)
        return {**shared, **posi}

    def prepare_batch(self, batch: list[dict], generator: torch.Generator | None = None) -> dict:
        """Prepare each item (noise seeds drawn from `generator`, else the global torch RNG) and stack
        per-sample tensors."""
        seeds = torch.randint(0, 2**31 - 1, (len(batch),), generator=generator).tolist()
        items = [self.prepare_sample(item, seed) for item, seed in zip(batch, seeds)]
        return stack_samples(items, self.units())

    # -- loss --------------------------------------------------------------------------------------
    def loss(self, inputs: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow matching: x_t = (1 - sigma) x0 + sigma noise, target noise - x0, weighted MSE; sigmas drawn from
        `generator` (else the global torch RNG)."""
        x0, noise = inputs["input_latents"].float(), inputs["noise"].float()
        b, _, h, w = x0.shape
        sigma, weight = self.sigma_sampler(b, (h // 2) * (w // 2), generator)
        sigma, weight = sigma.to(x0.device), weight.to(x0.device)
        latents = add_noise(x0, noise, sigma.view(-1, 1, 1, 1)).to(self.pipe.torch_dtype)
        offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) \
            if self.offload_activations else contextlib.nullcontext()
        with offload:
            pred = self.pipe.model_fn(self.pipe.in_loop_models(), **self.pipe.model_inputs(self.units(), inputs),
                                      latents=latents, timestep=sigma,
                                      step_units=[u for u in self.pipe.units if isinstance(u, StepUnit)])
        per_sample = (pred.float() - training_target(x0, noise)).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * weight).mean()

    def forward(self, batch: list[dict], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.loss(self.prepare_batch(batch, generator), generator)

    # -- saving ------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
