"""Loading the pipeline a profile names, on the right device, quietly, offline.

ShapesWorld (the committed model or a variant folder) or a real Stable Diffusion folder
(``model_path`` or $SAAM_MODEL_PATH; nothing is ever downloaded). ``device: auto`` takes CUDA in
fp16 where present, else the CPU in fp32. Loading messages that say nothing to a reader
(progress bars, notes about optional image processors) are silenced here, at their source.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import paths
from .progress import quiet

REAL_MODELS = {"sd14": "CompVis/stable-diffusion-v1-4", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "sd21": "stabilityai/stable-diffusion-2-1", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def resolve_device(device: str = "auto") -> tuple[str, torch.dtype]:
    """(device, dtype): ``auto`` is CUDA in fp16 where present, else CPU in fp32. Under ``accelerate
    launch`` each process takes its own GPU (``cuda:$LOCAL_RANK``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device, (torch.float16 if device.startswith("cuda") else torch.float32)


def model_path(params: dict) -> Path:
    """The folder a profile's model loads from; for real models, stop at once if it is absent."""
    if params.get("model", "shapesworld") == "shapesworld":
        path = Path(params.get("model_path") or paths.MODEL_DIR)
        return path if path.is_absolute() else paths.ROOT / path
    model = params["model"]
    path = os.environ.get("SAAM_MODEL_PATH") or params.get("model_path")
    if not path or not (Path(path) / "model_index.json").exists():
        ref = REAL_MODELS.get(model, model)
        raise FileNotFoundError(
            f"profile {params['profile']!r} needs the weights of {ref} as a local diffusers folder, and "
            f"none was found at {path!r}. On a machine with internet: `huggingface-cli download {ref} "
            f"--local-dir <dir>`, then `make all PROFILE={params['profile']} SAAM_MODEL_PATH=<dir>` "
            "(a GPU is strongly advised).")
    return Path(path)


def load_model(params: dict):
    """The pipeline a profile names, on ``params['device']`` (default auto), progress bars off."""
    device, dtype = resolve_device(params.get("device", "auto"))
    path = model_path(params)
    with quiet():
        if params.get("model", "shapesworld") == "shapesworld":
            from .shapes.model import load_pipeline
            pipe = load_pipeline(path, device=device)  # fp32: the organism is small
        else:
            from diffusers import DiffusionPipeline
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
            pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
