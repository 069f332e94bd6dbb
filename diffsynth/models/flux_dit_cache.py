"""Step caches for the DiT: TeaCache and First-Block-Cache, with one state per CFG branch.

Both skip the whole block stack on steps where the input barely changed, re-using the residual
(block-stack output minus its input, on the image tokens) of the branch's last computed step.

* TeaCache (`tea_cache_l1_thresh`): the signal is the image input modulated by the first double
  block's image AdaLN (`blocks[0].norm1_a`). The relative L1 change of that signal, mapped through the
  TeaCache-FLUX polynomial, accumulates; a step is skipped while the sum stays below the threshold.
* First-Block-Cache (`fbcache_thresh`): the first double block always runs; when its residual changed
  by less than the threshold (relative L1) since the last computed step, the remaining blocks are skipped.

The first and last steps are always computed, and a threshold of 0 never skips (identical to no cache).
Unlike a single shared state (which mixes the positive and negative passes under CFG: residuals and
the previous signal cross branches and the step counter runs twice as fast), each branch keeps its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.norms import norm_modulate

TEACACHE_FLUX_COEFFICIENTS = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)


def _rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    return ((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()


class BranchCache:
    """Cache state of one CFG branch."""

    def __init__(self, threshold: float, num_steps: int):
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold, self.num_steps = float(threshold), num_steps
        self.residual: torch.Tensor | None = None
        self.computed_steps: list[int] = []
        self.skipped_steps: list[int] = []

    def _forced(self, step: int) -> bool:
        return step == 0 or step == self.num_steps - 1 or self.residual is None

    def _record(self, step: int, compute: bool) -> bool:
        (self.computed_steps if compute else self.skipped_steps).append(step)
        return compute


class TeaCache(BranchCache):
    def __init__(self, threshold: float, num_steps: int, coefficients=TEACACHE_FLUX_COEFFICIENTS):
        super().__init__(threshold, num_steps)
        self.coefficients = tuple(coefficients)
        self.previous: torch.Tensor | None = None
        self.accumulated = 0.0

    def rescale(self, x: float) -> float:
        y = 0.0
        for c in self.coefficients:  # highest power first
            y = y * x + c
        return y

    def decide(self, step: int, signal: torch.Tensor) -> bool:
        """True: compute this step. `signal` is this branch's modulated image input."""
        if self._forced(step) or self.previous is None:
            compute = True
        else:
            self.accumulated += self.rescale(_rel_l1(signal, self.previous))
            compute = not self.accumulated < self.threshold
        if compute:
            self.accumulated = 0.0
        self.previous = signal
        return self._record(step, compute)


class FirstBlockCache(BranchCache):
    def __init__(self, threshold: float, num_steps: int):
        super().__init__(threshold, num_steps)
        self.previous: torch.Tensor | None = None  # first-block residual of the last computed step

    def decide(self, step: int, first_residual: torch.Tensor) -> bool:
        compute = self._forced(step) or self.previous is None or \
            not _rel_l1(first_residual, self.previous) < self.threshold
        if compute:
            self.previous = first_residual
        return self._record(step, compute)


class DenoiseCache:
    """The per-branch states of one generation (`posi`, and `nega` under CFG)."""

    def __init__(self, policy: str, threshold: float, num_steps: int, cfg: bool):
        kinds = {"teacache": TeaCache, "fbcache": FirstBlockCache}
        if policy not in kinds:
            raise ValueError(f"unknown cache policy {policy!r}; choose from {sorted(kinds)}")
        self.policy, self.threshold, self.num_steps = policy, threshold, num_steps
        self.branches = {b: kinds[policy](threshold, num_steps) for b in (("posi", "nega") if cfg else ("posi",))}

    def stats(self) -> dict:
        per = {b: {"computed": len(s.computed_steps), "skipped": len(s.skipped_steps),
                   "skipped_steps": list(s.skipped_steps)} for b, s in self.branches.items()}
        return {"policy": self.policy, "threshold": self.threshold, "num_inference_steps": self.num_steps,
                "skipped": sum(p["skipped"] for p in per.values()), "branches": per}


def make_cache(tea_cache_l1_thresh: float | None, fbcache_thresh: float | None, num_steps: int,
               cfg: bool) -> DenoiseCache | None:
    if tea_cache_l1_thresh is not None and fbcache_thresh is not None:
        raise ValueError("choose one cache: tea_cache_l1_thresh or fbcache_thresh, not both")
    if tea_cache_l1_thresh is not None:
        return DenoiseCache("teacache", tea_cache_l1_thresh, num_steps, cfg)
    if fbcache_thresh is not None:
        return DenoiseCache("fbcache", fbcache_thresh, num_steps, cfg)
    return None


@dataclass
class CachedStep:
    """One DiT evaluation under step caching: `dit.forward(..., cache=CachedStep(states, step))`.

    The batch is len(states) equal chunks, one per CFG branch; only the branches that must compute run
    the block stack (as one sub-batch), the others add their cached residual to the input tokens. `run`
    is FLUX.1's DiT; other DiTs decide with `chunks` and the states, then finish with `blend`.
    """
    states: list[BranchCache]
    step: int

    def chunks(self, batch: int) -> list[slice]:
        n = len(self.states)
        if batch % n:
            raise ValueError(f"batch of {batch} does not split into {n} CFG branches")
        size = batch // n
        return [slice(i * size, (i + 1) * size) for i in range(n)]

    def blend(self, compute: list[bool], base: torch.Tensor, tail) -> torch.Tensor:
        """The block stack's image output for the whole batch. `base`: the image tokens the residuals are
        relative to (B, L, C); `tail(rows)`: the rest of the stack on those batch rows (None: all of them).
        Computed branches refresh their residual; the others reuse theirs."""
        chunk = self.chunks(base.shape[0])
        if all(compute):
            out = tail(None)
            for s, c in zip(self.states, chunk):
                s.residual = out[c] - base[c]
            return out
        parts = [base[c] + s.residual for s, c in zip(self.states, chunk)]
        todo = [i for i, flag in enumerate(compute) if flag]
        if todo:
            size = chunk[0].stop - chunk[0].start
            rows = torch.cat([torch.arange(chunk[i].start, chunk[i].stop, device=base.device) for i in todo])
            out = tail(rows)
            for j, i in enumerate(todo):
                parts[i] = out[j * size:(j + 1) * size]
                self.states[i].residual = parts[i] - base[chunk[i]]
        return torch.cat(parts)

    def first_block_decisions(self, first_residual: torch.Tensor) -> list[bool]:
        """First-Block-Cache: each branch decides on its own rows of the first block's residual."""
        return [s.decide(self.step, first_residual[c]) for s, c in zip(self.states, self.chunks(len(first_residual)))]

    def run(self, dit, img, txt, vec, rope, ext) -> torch.Tensor:
        if not len(dit.blocks):
            raise ValueError("step caches need a DiT with at least one double block")
        chunk = self.chunks(img.shape[0])
        if isinstance(self.states[0], TeaCache):
            shift, scale = dit.blocks[0].norm1_a(vec)[:2]
            signal = norm_modulate(img, shift, scale)
            compute = [s.decide(self.step, signal[c]) for s, c in zip(self.states, chunk)]
            start, img0, txt0 = 0, img, txt
        else:
            img0, txt0 = dit._call(dit.blocks[0], img, txt, vec, rope, ext.mask, ext.attention_for("double", 0))
            img0 = ext.add_residual("double", 0, img0)
            compute, start = self.first_block_decisions(img0 - img), 1

        def tail(rows):
            if rows is None:
                return dit.run_blocks(img0, txt0, vec, rope, ext, start=start)
            return dit.run_blocks(img0[rows], txt0[rows], vec[rows], rope, ext.rows(rows), start=start)
        return self.blend(compute, img0, tail)
