"""Checkpoint formats, detection, ModelConfig resolution and loading errors."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth import CheckpointError, FluxImagePipeline, ModelConfig
from diffsynth.loading import download as dl
from diffsynth.loading.registry import build, describe, detect
from diffsynth.testing import build_tiny_comfy_checkpoint, build_tiny_flux

TEXT = ("text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")
quiet = dict(progress_bar_cmd=lambda x: x, height=64, width=64, num_inference_steps=2, seed=0,
             t5_sequence_length=16, output_type="latent")


def pipe_from(paths, **kw):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(p)) for p in paths], **kw)


@pytest.fixture(scope="module")
def reference_pipe(tiny_root):
    return pipe_from([tiny_root / "flux1-dev.safetensors"] + [tiny_root / p for p in TEXT])


@pytest.fixture(scope="module")
def reference(reference_pipe):
    return reference_pipe("a cat", **quiet)


def assert_same_model(pipe, reference_pipe, reference):
    """Bit-identical weights; outputs equal up to float rounding (CPU kernels vary with buffer alignment)."""
    for name in ("dit", "text_encoder_1", "text_encoder_2", "vae_encoder", "vae_decoder"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(reference_pipe, name).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name
    torch.testing.assert_close(pipe("a cat", **quiet), reference, rtol=1e-5, atol=1e-5)


def test_detects_each_file_of_the_flux_dev_layout(tiny_root):
    kinds = {p: [(d.family, d.format, d.components) for d in detect(str(tiny_root / p))]
             for p in ("flux1-dev.safetensors",) + TEXT}
    assert kinds == {
        "flux1-dev.safetensors": [("flux-dit", "bfl", ("dit",))],
        "text_encoder/model.safetensors": [("clip", "hf", ("text_encoder_1",))],
        "text_encoder_2/": [("t5", "hf", ("text_encoder_2",))],
        "ae.safetensors": [("flux-vae", "bfl", ("vae_encoder", "vae_decoder"))],
    }


def test_prefixed_bfl_file_loads_identically(tiny_root, tmp_path, reference_pipe, reference):
    sd = load_file(tiny_root / "flux1-dev.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, tmp_path / "prefixed.safetensors")
    pipe = pipe_from([tmp_path / "prefixed.safetensors"] + [tiny_root / p for p in TEXT])
    assert_same_model(pipe, reference_pipe, reference)


def test_diffusers_sharded_transformer_folder(tmp_path, tiny_root, reference):
    root = build_tiny_flux(tmp_path / "diffusers", dit_format="diffusers")
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    got = pipe_from([root / "transformer"] + [tiny_root / p for p in TEXT])("a cat", **quiet)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_comfyui_all_in_one_file_yields_four_models(tmp_path, tiny_root, reference_pipe, reference):
    path = build_tiny_comfy_checkpoint(tmp_path / "flux1-dev-comfy.safetensors")
    families = sorted(d.family for d in detect(str(path)))
    assert families == ["clip", "flux-dit", "flux-vae", "t5"]
    pipe = pipe_from([path], tokenizer_1_path=tiny_root / "tokenizer", tokenizer_2_path=tiny_root / "tokenizer_2")
    assert_same_model(pipe, reference_pipe, reference)


def test_comfyui_file_without_tokenizers_says_where_it_looked(tmp_path):
    path = build_tiny_comfy_checkpoint(tmp_path / "aio.safetensors")
    with pytest.raises(FileNotFoundError, match="tokenizer.*looked in"):
        pipe_from([path])


def test_fp8_stored_dit_close_to_fp32(tiny_root, tmp_path, reference):
    sd = load_file(tiny_root / "flux1-dev.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, tmp_path / "flux1-dev-fp8.safetensors")
    assert detect(str(tmp_path / "flux1-dev-fp8.safetensors"))[0].dtypes == {"float8_e4m3fn": len(sd)}
    got = pipe_from([tmp_path / "flux1-dev-fp8.safetensors"] + [tiny_root / p for p in TEXT])("a cat", **quiet)
    assert got.dtype == torch.float32
    rel = (got - reference).norm() / reference.norm()
    assert 0 < rel < 0.1


def test_schnell_without_guidance_embedder(tmp_path, tiny_root):
    root = build_tiny_flux(tmp_path / "schnell", guidance=False)
    pipe = pipe_from([root / "flux1-dev.safetensors"] + [root / p for p in TEXT])
    assert pipe.dit.guidance_embedder is None
    with pytest.warns(UserWarning, match=r"embedded_guidance=1.0 does nothing: this DiT has no guidance embedder "
                                         r"\(schnell-like"):
        a = pipe("a cat", embedded_guidance=1.0, **quiet)
    assert not pipe.uses_embedded_guidance
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default is silent
        assert torch.equal(a, pipe("a cat", **quiet))  # guidance has no input to go to
    info = describe(detect(str(root / "flux1-dev.safetensors"))[0])
    assert "schnell" in info["architecture"]["variant"]


def test_internal_names_checkpoint_is_detected(tiny_root, tmp_path, reference_pipe, reference):
    """A full fine-tune saved in our/DiffSynth names (optionally with pipe.dit.) loads without the base model."""
    pipe = pipe_from([tiny_root / "flux1-dev.safetensors"] + [tiny_root / p for p in TEXT])
    save_file({"pipe.dit." + k: v for k, v in pipe.dit.state_dict().items()}, tmp_path / "finetune.safetensors")
    assert detect(str(tmp_path / "finetune.safetensors"))[0].format == "diffsynth"
    assert_same_model(pipe_from([tmp_path / "finetune.safetensors"] + [tiny_root / p for p in TEXT]),
                      reference_pipe, reference)


def test_torch_bin_file_loads_weights_only(tiny_root, tmp_path):
    sd = load_file(tiny_root / "ae.safetensors")
    torch.save(sd, tmp_path / "ae.bin")
    models = build(detect(str(tmp_path / "ae.bin"))[0])
    assert set(models) == {"vae_encoder", "vae_decoder"}


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights-only"):
        detect(str(tmp_path / "evil.ckpt"))


def test_truncated_safetensors_is_named(tiny_root, tmp_path):
    data = (tiny_root / "ae.safetensors").read_bytes()
    (tmp_path / "ae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        pipe_from([tmp_path / "ae.safetensors"])


def test_garbage_file_is_named(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="x.safetensors"):
        detect(str(tmp_path / "x.safetensors"))


def test_non_flux_file_is_rejected_with_its_keys(tmp_path):
    save_file({"conv.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a recognised model file.*conv.weight"):
        pipe_from([tmp_path / "other.safetensors"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        pipe_from([tmp_path / "nope.safetensors"])


def test_model_config_needs_path_or_model_id():
    with pytest.raises(ValueError, match="path.*model_id"):
        ModelConfig()
    with pytest.raises(ValueError, match="download_resource"):
        ModelConfig(model_id="a/b", download_resource="ftp")


# ----------------------------------------------------------------------------- offline-first resolution

@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def fake(name):
        def download(model_id, local_dir, allow, ignore):
            calls.append((name, model_id, allow, ignore))
            os.makedirs(os.path.join(local_dir, "text_encoder_2"), exist_ok=True)
            open(os.path.join(local_dir, "flux1-dev.safetensors"), "wb").close()
            open(os.path.join(local_dir, "text_encoder_2", "model.safetensors"), "wb").close()
        return download
    monkeypatch.setitem(dl.SOURCES, "modelscope", fake("modelscope"))
    monkeypatch.setitem(dl.SOURCES, "huggingface", fake("huggingface"))
    return calls


def test_files_already_on_disk_never_download(tmp_path, no_network):
    folder = tmp_path / "black-forest-labs" / "FLUX.1-dev"
    folder.mkdir(parents=True)
    (folder / "flux1-dev.safetensors").write_bytes(b"")
    cfg = ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors",
                      local_model_path=str(tmp_path))
    assert cfg.resolve() == str(folder / "flux1-dev.safetensors")
    assert no_network == []


def test_missing_files_download_with_allow_pattern(tmp_path, no_network):
    cfg = ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/",
                      local_model_path=str(tmp_path))
    assert cfg.resolve() == str(tmp_path / "black-forest-labs/FLUX.1-dev/text_encoder_2/")
    assert no_network == [("modelscope", "black-forest-labs/FLUX.1-dev", "text_encoder_2/*", [])]
    cfg = ModelConfig(model_id="x/y", origin_file_pattern="*.safetensors", local_model_path=str(tmp_path),
                      download_resource="HuggingFace")
    cfg.resolve()
    assert no_network[-1][0] == "huggingface"


def test_download_skips_files_present(tmp_path, no_network):
    folder = tmp_path / "x" / "y"
    folder.mkdir(parents=True)
    (folder / "ae.safetensors").write_bytes(b"")
    ModelConfig(model_id="x/y", origin_file_pattern="flux1-dev.safetensors", local_model_path=str(tmp_path)).resolve()
    assert no_network[0][3] == ["ae.safetensors"]


def test_skip_download_raises_instead_of_downloading(tmp_path, no_network):
    cfg = ModelConfig(model_id="x/y", origin_file_pattern="ae.safetensors", local_model_path=str(tmp_path),
                      skip_download=True)
    with pytest.raises(FileNotFoundError, match="skip_download"):
        cfg.resolve()
    assert no_network == []


# ----------------------------------------------------------------------------- memory

PEAK_SCRIPT = r"""
import sys, torch
from diffsynth.loading.registry import build, detect
def status_mb(field):  # VmHWM, unlike ru_maxrss, starts afresh at exec (not inherited from pytest)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024
build(detect(sys.argv[2])[0], torch.bfloat16)  # warm-up: every lazy import happens before the baseline
base = status_mb("VmRSS")
model = build(detect(sys.argv[1])[0], torch.bfloat16)["dit"]
touched = sum(p.float().sum().item() for p in model.parameters())  # page every weight in
peak = status_mb("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(f"{base} {peak} {weights}")
"""


def test_loading_peak_rss_close_to_weight_size(tmp_path, tiny_root):
    """Mid-size DiT (~180 MB bf16): peak RSS growth while loading < 1.5x the weights."""
    from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_to_bfl
    config = FluxDiTConfig(hidden_size=768, num_heads=6, num_double_blocks=3, num_single_blocks=3,
                           context_dim=256, pooled_dim=64)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxDiT(config).state_dict().items()}
    path = tmp_path / "mid.safetensors"
    save_file(dit_to_bfl({k: torch.randn(s, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}), path)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(tiny_root / "flux1-dev.safetensors")],
                         capture_output=True, text=True, check=True)
    base, peak, weights = map(float, out.stdout.split())
    assert weights > 150
    assert (peak - base) / weights < 1.5, (base, peak, weights)


def test_lora_file_given_as_model_says_so(tmp_path):
    save_file({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 32),
               "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 4)}, tmp_path / "style.safetensors")
    with pytest.raises(CheckpointError, match="is a LoRA.*pipe.load_lora"):
        detect(str(tmp_path / "style.safetensors"))


def test_diffusers_vae_file_loads_like_ae_safetensors(tiny_root, tmp_path, reference_pipe):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from diffsynth.testing import TINY
    v = TINY["vae"]
    config = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[v["ch"] * m for m in v["ch_mult"]],
                  layers_per_block=v["num_res_blocks"], norm_num_groups=32)
    diffusers_sd = convert_ldm_vae_checkpoint(load_file(tiny_root / "ae.safetensors"), config)  # diffusers' converter
    save_file(diffusers_sd, tmp_path / "diffusion_pytorch_model.safetensors")
    (det,) = detect(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert (det.family, det.format) == ("flux-vae", "diffusers")
    models = build(det)
    for name in ("vae_encoder", "vae_decoder"):
        ours, ref = models[name].state_dict(), getattr(reference_pipe, name).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name


def test_model_id_configs_fetch_missing_tokenizers_from_the_same_repo(tiny_root, tmp_path, monkeypatch):
    import shutil
    repo = tmp_path / "models" / "black-forest-labs" / "FLUX.1-dev"
    shutil.copytree(tiny_root, repo, ignore=shutil.ignore_patterns("tokenizer*"))
    fetched = []

    def fake_download(model_id, local_dir, allow, ignore):
        fetched.append(allow)
        shutil.copytree(tiny_root / allow.rstrip("/*"), os.path.join(local_dir, allow.rstrip("/*")))
    monkeypatch.setitem(dl.SOURCES, "modelscope", fake_download)
    configs = [ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern=p,
                           local_model_path=str(tmp_path / "models"))
               for p in ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)
    assert sorted(fetched) == ["tokenizer/*", "tokenizer_2/*"]  # only what was missing
    assert pipe("a cat", **quiet).shape == (1, 16, 8, 8)


def test_every_model_file_with_a_table_entry_is_registered_once():
    """A model file's entry (COMPONENTS / FAMILIES at its end) reaches the table only through MODEL_FILES: one
    forgotten there would leave its files unrecognised."""
    import importlib
    import pkgutil
    import diffsynth.models as models
    from diffsynth.loading import components
    declaring = set()
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"diffsynth.models.{info.name}")
        if hasattr(module, "FAMILIES") or hasattr(module, "COMPONENTS"):
            declaring.add(module)
    assert declaring == set(components.MODEL_FILES) and len(components.MODEL_FILES) == len(declaring)
    names = [f.name for f in components.FAMILIES]
    assert len(names) == len(set(names)) and len(components.COMPONENT_BY_NAME) == len(components.COMPONENTS)
