"""Units declare their order (data flow, `needs`, `after`) and their image inputs; nothing is positional."""
from __future__ import annotations

import pkgutil

import pytest

from diffsynth.pipelines import variants
from diffsynth.pipelines.units import image_inputs, order_units, step_unit, unit


def _names(units):
    return [u.name for u in units]


@unit(outputs=("size",))
def default_size(pipe):
    return {}


@unit(outputs=("size",))
def round_size(pipe, size):  # rewrites a value: after the units that only write it
    return {}


@unit(outputs=("noise",))
def make_noise(pipe, size):
    return {}


@unit(outputs=("emb",))
def encode(pipe, prompt):
    return {}


@unit(outputs=("emb",), needs=("emb",))
def extend(pipe):  # reads the embedding through the branch dicts
    return {}


@unit(outputs=("extra",), needs=("emb",))
def read_emb(pipe):
    return {}


def test_data_flow_orders_units_whatever_the_list_order():
    units = [make_noise, read_emb, round_size, extend, default_size, encode]
    order = _names(order_units(units))
    assert order.index("default_size") < order.index("round_size") < order.index("make_noise")
    assert order.index("encode") < order.index("extend") < order.index("read_emb")
    # without a constraint the given order stays
    assert _names(order_units([encode, default_size])) == ["encode", "default_size"]
    assert _names(order_units([default_size, encode])) == ["default_size", "encode"]


def test_after_orders_step_units_and_cycles_are_named():
    @step_unit(after=("second",))
    def third(models, call, step):
        pass

    @step_unit(after=("first",))
    def second(models, call, step):
        pass

    @step_unit()
    def first(models, call, step):
        pass
    assert _names(order_units([third, second, first])) == ["first", "second", "third"]
    assert _names(order_units([third, second])) == ["second", "third"]  # an absent unit constrains nothing

    @step_unit(after=("third",))
    def first_again(models, call, step):
        pass
    looping = step_unit(after=("first_again",))(third.fn)
    with pytest.raises(ValueError, match="cycle among.*first_again.*third"):
        order_units([looping, first_again])


def test_image_inputs_are_declared_parameters():
    @unit(image_inputs=("picture",))
    def uses_picture(pipe, picture=None, strength=1.0):
        return {}
    assert image_inputs([uses_picture, encode]) == ("picture",)
    with pytest.raises(ValueError, match=r"image inputs \['photo'\] are not among its parameters"):
        unit(image_inputs=("photo",))(lambda pipe, picture=None: {})


def test_every_variant_module_is_collected_and_the_pipeline_order_holds():
    modules = {m.name for m in pkgutil.iter_modules(variants.__path__) if not m.name.startswith("_")}
    assert {m.__name__.rsplit(".", 1)[1] for m in variants.VARIANTS} == modules
    from diffsynth.pipelines.flux_image import BASE_UNITS
    order = _names(BASE_UNITS)
    before = [("prepare_insert_anything", "check_shape"),       # sets the size and the Fill inputs
              ("encode_prompt", "append_redux_tokens"), ("encode_prompt", "encode_nexus_gen_prompt"),
              ("append_redux_tokens", "encode_eligen_entities"),  # entities are encoded beside the final prompt
              ("encode_input_image", "prepare_eligen_inpaint"), ("collect_controlnet_columns", "encode_identity"),
              ("step1x_step", "apply_controlnets"), ("use_identity", "apply_controlnets"),
              ("apply_controlnets", "append_prompt_tokens"), ("append_prompt_tokens", "eligen_attention")]
    assert [(a, b) for a, b in before if order.index(a) > order.index(b)] == []
    assert set(variants.IMAGE_INPUTS) >= {"kontext_images", "flux_fill_image", "flux_fill_mask", "flux_redux_image",
                                          "infinityou_id_image", "insert_anything_ref_mask", "step1x_reference_image"}


def test_training_batches_stack_what_units_declare_per_sample():
    import torch
    from diffsynth.training.module import stack_samples

    @unit(outputs=("noise", "ids", "stop"), model_inputs=("ids", "stop"), stack=("noise",))
    def prepare(pipe):
        return {}

    @unit(per_branch=True, outputs=("emb",), model_inputs=("emb",))
    def embed(pipe, prompt):
        return {}
    a = {"noise": torch.zeros(1, 2), "ids": torch.arange(3)[None], "stop": 0.5, "emb": torch.ones(1, 4)}
    b = {"noise": torch.ones(1, 2), "ids": torch.arange(3)[None], "stop": 0.5, "emb": torch.zeros(1, 4)}
    out = stack_samples([a, b], [prepare, embed])
    assert torch.equal(out["noise"], torch.tensor([[0.0, 0.0], [1.0, 1.0]])) and out["emb"].shape == (2, 4)
    assert out["ids"].shape == (1, 3)  # shared by the batch: not stacked
    with pytest.raises(ValueError, match="stop differs between the samples of one training batch"):
        stack_samples([a, {**b, "stop": 0.3}], [prepare, embed])
    with pytest.raises(ValueError, match="noise cannot be stacked"):
        stack_samples([a, {**b, "noise": torch.ones(1, 3)}], [prepare, embed])
    assert prepare.per_sample == ("noise",) and embed.per_sample == ("emb",)
