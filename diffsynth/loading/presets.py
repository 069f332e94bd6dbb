"""DiffSynth-Studio 1.x's `download_models(presets)`: a preset's files fetched into the folders that
`ModelConfig(model_id=...)` reads, and the annotator files into `Annotators/`."""
from __future__ import annotations

import os
from typing import Sequence

from .download import DownloadError, _first_source, _priority, fetch
from .model_config import ModelConfig

_FLUX_DEV = "black-forest-labs/FLUX.1-dev"
_ENCODERS_AND_VAE = [(_FLUX_DEV, "text_encoder/model.safetensors"), (_FLUX_DEV, "text_encoder_2/"),
                     (_FLUX_DEV, "ae.safetensors")]
# preset name -> (model_id, file pattern) of each file; variants reuse FLUX.1-dev's text encoders and VAE
FLUX_PRESETS: dict[str, list[tuple[str, str]]] = {
    "FLUX.1-dev": [(_FLUX_DEV, "flux1-dev.safetensors"), *_ENCODERS_AND_VAE],
    "FLUX.1-schnell": [("black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors"), *_ENCODERS_AND_VAE],
    "FLUX.1-Krea-dev": [("black-forest-labs/FLUX.1-Krea-dev", "flux1-krea-dev.safetensors"), *_ENCODERS_AND_VAE],
    "FLUX.1-Kontext-dev": [("black-forest-labs/FLUX.1-Kontext-dev", "flux1-kontext-dev.safetensors"),
                           *_ENCODERS_AND_VAE],
}


# DiffSynth-Studio 1.x's annotator presets: the weight files controlnet_aux's detectors read (see
# controlnets.processors), saved flat into `<local_model_path>/Annotators/`, Annotator's default model_path.
# The files live in a different repository on each hub.
ANNOTATOR_REPOS = {"modelscope": "sd_lora/Annotators", "huggingface": "lllyasviel/Annotators"}
ANNOTATOR_PRESETS = {f"Annotators:{name.capitalize()}": name
                     for name in ("depth", "softedge", "lineart", "normal", "openpose")}


def _annotator_files(preset: str) -> tuple[str, ...]:
    from ..controlnets.processors import LEARNED
    return LEARNED[ANNOTATOR_PRESETS[preset]].files


def _download_annotators(preset: str, sources: list[str], local_model_path: str) -> list[str]:
    """The preset's files under `local_model_path/Annotators/`; only the missing ones are downloaded."""
    folder = os.path.join(local_model_path, "Annotators")
    paths = []
    for name in _annotator_files(preset):
        def attempt(source, name=name):
            fetch(ANNOTATOR_REPOS[source], name, folder, source)
            if not os.path.isfile(os.path.join(folder, name)):
                raise DownloadError(f"{ANNOTATOR_REPOS[source]} has no file {name!r} on {source}")
        if not os.path.isfile(os.path.join(folder, name)):
            _first_source(sources, attempt)
        paths.append(os.path.join(folder, name))
    return paths


def download_models(model_id_list: Sequence[str] = (), downloading_priority: Sequence[str] = ("ModelScope",
                    "HuggingFace"), local_model_path: str = "./models") -> list[str]:
    """Fetch preset models (names in FLUX_PRESETS) into the folders `ModelConfig(model_id=...)` reads
    (`local_model_path/<model_id>/`), so that later model_id configs find them offline; the annotator presets
    (`Annotators:Depth`, ... in ANNOTATOR_PRESETS) into `local_model_path/Annotators/`, where
    `Annotator(...)` reads them. Files already there are not downloaded again.
    Returns the local paths (a folder for `text_encoder_2/`)."""
    known = sorted(FLUX_PRESETS) + sorted(ANNOTATOR_PRESETS)
    unknown = [m for m in model_id_list if m not in known]
    if unknown:
        raise ValueError(f"unknown preset model(s) {unknown}; known: {known}. Other files: "
                         f"download_customized_models(model_id, origin_file_path, local_dir)")
    sources, paths = _priority(downloading_priority), []
    for preset in model_id_list:
        if preset in ANNOTATOR_PRESETS:
            paths += _download_annotators(preset, sources, local_model_path)
            continue
        for model_id, pattern in FLUX_PRESETS[preset]:
            def attempt(source, model_id=model_id, pattern=pattern):
                resolved = ModelConfig(model_id=model_id, origin_file_pattern=pattern, download_resource=source,
                                       local_model_path=local_model_path).resolve()
                paths.extend([resolved] if isinstance(resolved, str) else resolved)
            _first_source(sources, attempt)
    return paths
