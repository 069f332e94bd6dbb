"""TeaCache / First-Block-Cache (one state per CFG branch) and batched CFG on the tiny pipeline."""
import pytest
import torch

from diffsynth.models.flux_dit_cache import TEACACHE_FLUX_COEFFICIENTS, FirstBlockCache, TeaCache, make_cache

KW = dict(height=64, width=96, num_inference_steps=8, t5_sequence_length=16, seed=3,
          progress_bar_cmd=lambda x: x, output_type="latent")
CFG = dict(cfg_scale=3.0, negative_prompt="blurry dog")


def test_teacache_polynomial_and_decisions():
    cache = TeaCache(0.5, num_steps=6)
    x = 0.1
    assert cache.rescale(x) == pytest.approx(sum(c * x ** (4 - i) for i, c in enumerate(TEACACHE_FLUX_COEFFICIENTS)))
    base = torch.ones(4)
    decisions = [cache.decide(0, base)]
    cache.residual = torch.zeros(1)
    for step in range(1, 6):  # tiny changes: poly(~0.01) ~ 0.23 per step accumulates past 0.5 every 3rd step
        decisions.append(cache.decide(step, base * (1 + 0.01 * step)))
    assert decisions == [True, False, False, True, False, True]  # last step always computed
    assert cache.skipped_steps == [1, 2, 4]


def test_fbcache_compares_with_last_computed_residual():
    cache = FirstBlockCache(0.1, num_steps=5)
    r = torch.ones(4)
    assert cache.decide(0, r)
    cache.residual = torch.zeros(1)
    assert not cache.decide(1, r * 1.05)
    assert not cache.decide(2, r * 1.09)  # still within 10% of step 0's residual
    assert cache.decide(3, r * 1.2)
    assert cache.decide(4, r * 1.2)  # last step


def test_make_cache_arguments():
    assert make_cache(None, None, 4, True) is None
    assert set(make_cache(0.3, None, 4, True).branches) == {"posi", "nega"}
    with pytest.raises(ValueError, match="not both"):
        make_cache(0.3, 0.1, 4, False)
    with pytest.raises(ValueError, match=">= 0"):
        make_cache(-1.0, None, 4, False)


@pytest.mark.parametrize("cfg", [{}, CFG], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("policy", ["tea_cache_l1_thresh", "fbcache_thresh"])
def test_threshold_zero_is_identical_to_no_cache(tiny_pipe, policy, cfg):
    plain = tiny_pipe("a cat", **KW, **cfg)
    assert tiny_pipe.last_cache_stats is None
    cached = tiny_pipe("a cat", **KW, **cfg, **{policy: 0.0})
    assert torch.equal(cached, plain)
    stats = tiny_pipe.last_cache_stats
    assert stats["skipped"] == 0 and all(b["computed"] == 8 for b in stats["branches"].values())


@pytest.mark.parametrize("policy", ["tea_cache_l1_thresh", "fbcache_thresh"])
def test_positive_threshold_skips_counted_steps(tiny_pipe, policy):
    plain = tiny_pipe("a cat", **KW)
    out = tiny_pipe("a cat", **KW, **{policy: 10.0})
    stats = tiny_pipe.last_cache_stats
    branch = stats["branches"]["posi"]
    assert stats["policy"] == ("teacache" if policy.startswith("tea") else "fbcache")
    assert branch["skipped"] == stats["skipped"] > 0 and branch["computed"] + branch["skipped"] == 8
    assert 0 not in branch["skipped_steps"] and 7 not in branch["skipped_steps"]
    assert not torch.equal(out, plain)
    assert ((out - plain).norm() / plain.norm()).item() < 1.0  # an approximation, not noise


@pytest.mark.parametrize("policy, thresh", [("tea_cache_l1_thresh", 0.6), ("fbcache_thresh", 0.3)])
def test_one_cache_state_per_cfg_branch(tiny_pipe, policy, thresh):
    # With the negative prompt equal to the positive one, CFG leaves the trajectory unchanged, so each
    # branch's own state must make exactly the decisions of the no-CFG run (a shared state would not).
    alone = tiny_pipe("a cat", **KW, **{policy: thresh})
    solo = tiny_pipe.last_cache_stats["branches"]["posi"]["skipped_steps"]
    assert 0 < len(solo) < 6
    for batch_cfg in (True, False):
        both = tiny_pipe("a cat", **KW, cfg_scale=3.0, negative_prompt="a cat", batch_cfg=batch_cfg,
                         **{policy: thresh})
        stats = tiny_pipe.last_cache_stats["branches"]
        assert stats["posi"]["skipped_steps"] == stats["nega"]["skipped_steps"] == solo
        torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-4)
    # different prompts: each branch decides on its own, and both run every step (computed or skipped)
    tiny_pipe("a cat", **KW, **CFG, **{policy: thresh})
    for branch in tiny_pipe.last_cache_stats["branches"].values():
        assert branch["computed"] + branch["skipped"] == 8


@pytest.mark.parametrize("policy", [None, "tea_cache_l1_thresh", "fbcache_thresh"])
def test_batched_cfg_matches_sequential(tiny_pipe, policy):
    extra = {} if policy is None else {policy: 0.6 if policy.startswith("tea") else 0.3}
    batched = tiny_pipe("a cat", **KW, **CFG, **extra)
    skipped = tiny_pipe.last_cache_stats and tiny_pipe.last_cache_stats["branches"]
    sequential = tiny_pipe("a cat", **KW, **CFG, batch_cfg=False, **extra)
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-4)
    if policy is not None:
        assert skipped == tiny_pipe.last_cache_stats["branches"]


def test_batched_cfg_is_one_forward_per_step(tiny_pipe, monkeypatch):
    from diffsynth.pipelines import flux_image
    calls = []
    monkeypatch.setattr(tiny_pipe, "model_fn", lambda dit, **kw: calls.append(kw["latents"].shape[0]) or
                        flux_image.model_fn(dit, **kw))
    tiny_pipe("a cat", **{**KW, "num_inference_steps": 2}, **CFG)
    assert calls == [2, 2]
    calls.clear()
    tiny_pipe("a cat", **{**KW, "num_inference_steps": 2}, **CFG, batch_cfg=False)
    assert calls == [1, 1, 1, 1]
