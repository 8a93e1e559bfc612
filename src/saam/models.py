"""Loading the pipeline a profile names, on the right device, quietly, offline.

ShapesWorld (the committed model or a variant folder) or a real Stable Diffusion folder
(``model_path`` or $SAAM_MODEL_PATH; nothing is ever downloaded). ``device: auto`` takes CUDA in
fp16 where present, else the CPU in fp32. Loading messages that say nothing to a reader
(progress bars, notes about optional image processors) are silenced here, at their source.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import torch

from . import paths
# the model family each real-model profile expects, and a folder's, are the adapters' (saam.family)
from .family import COMPONENTS, FAMILIES, folder_family as model_family, width_rules  # noqa: F401
from .progress import quiet



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


def denoiser_name(index: dict) -> str:
    """The denoiser's folder in a diffusers model folder: ``unet`` or (MM-DiTs) ``transformer``."""
    return "transformer" if "transformer" in index else "unet"


def check_model_folder(path: Path, model: str, profile: str) -> None:
    """The components a profile needs are in the folder (configs, weights, tokenizer files), and the
    folder holds the model family the profile names: errors say which file and what to do."""
    import json
    path = Path(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path / 'model_index.json'}: unreadable ({e})") from None
    family = FAMILIES.get(model)
    den = denoiser_name(index)
    need = [den, "vae", "text_encoder", "tokenizer", "scheduler"] + COMPONENTS.get(index.get("_class_name"), [])
    problems = []
    for c in need:
        d = path / c
        if c not in index:
            problems.append(f"model_index.json names no {c}")
        elif c.startswith("tokenizer"):
            if not any((d / f).exists() for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
                problems.append(f"{c}/ has no tokenizer files (tokenizer.json, vocab.json or vocab.txt)")
        elif c == "scheduler":
            if not (d / "scheduler_config.json").exists():
                problems.append("scheduler/scheduler_config.json is missing")
        elif not (d / "config.json").exists():
            problems.append(f"{c}/config.json is missing")
        elif not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
            problems.append(f"{c}/ has no weights (*.safetensors or *.bin)")
    if not problems:
        widths = check_widths(path, index)
        if widths:
            raise ValueError(f"{path}: " + "; ".join(widths))
    if problems:
        raise FileNotFoundError(f"{path} is not a complete diffusers folder for profile {profile!r}: " + "; ".join(problems)
                                + ". Download the whole model (hf download <id> --local-dir <dir>).")
    if family is None:
        return
    try:
        got = model_family(index, json.loads((path / den / "config.json").read_text()))
    except ValueError as e:
        raise FileNotFoundError(f"{path / den / 'config.json'}: not valid JSON ({e})") from None
    if got != family:
        fits = [k for k, v in FAMILIES.items() if v == got]
        raise ValueError(f"profile {profile!r} expects {family}, but {path} holds {got}; use "
                         + (f"PROFILE={' or '.join(fits)}" if fits else "a profile for that model") + " for this folder")


def check_organism_folder(path: Path) -> None:
    """A ShapesWorld organism's folder: there, complete, and of a known variant (``saam.json``)."""
    from .shapes.model import variant_of
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"no ShapesWorld organism at {path} (model_path): it needs a diffusers folder with "
                                "model_index.json, e.g. data/variants/D or data/shapesworld-model (`make model` trains one)")
    import json
    index = json.loads((path / "model_index.json").read_text())
    listed = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None)
    for c in listed:  # the components its model_index.json names (the MM-DiT organism's text encoder is the package's)
        if not (path / c).is_dir():
            raise FileNotFoundError(f"{path} is not a complete organism folder: {c}/ is missing")
    try:
        variant_of(path)
    except ValueError as e:
        raise ValueError(f"model_path {path}: {e}") from None


def check_widths(path: Path, index: dict) -> list[str]:
    """Where a folder's denoiser and text encoders disagree in width (each a sentence; none: agree).
    A UNet's ``cross_attention_dim`` is its text encoders' hidden sizes summed (SDXL concatenates
    both); an MM-DiT's ``joint_attention_dim`` is T5's ``d_model`` (SD3's third encoder, Flux's second)
    and its ``pooled_projection_dim`` the CLIP pooled width(s) (SD3: both projections; Flux: CLIP-L's)."""
    import json

    def cfg(c):
        try:
            return json.loads((path / c / "config.json").read_text())
        except (OSError, ValueError):
            return None
    den = denoiser_name(index)
    d, cls = cfg(den), index.get("_class_name")
    if d is None:
        return []
    out = []

    def agree(key, want, what):
        have = d.get(key)
        values = have if isinstance(have, list) else [have]
        if have is not None and want is not None and any(v != want for v in values):
            out.append(f"{den}/config.json has {key} {have} but {what} is {want}: the denoiser and the text "
                       "encoder(s) come from different models")
    encoders = [cfg(c) for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if c in index]
    if any(e is None for e in encoders):
        return out
    for key, want, what in width_rules(cls, den, encoders):
        agree(key, want, what)
    return out


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a Hugging Face repo id: owner/name


def resolve(ref: str | os.PathLike) -> Path:
    """A model reference as a local folder: a folder as it is, or a Hugging Face repo id
    (``owner/name``) looked up in the local Hugging Face cache (``$HF_HUB_CACHE``, by default
    ``~/.cache/huggingface/hub``) by huggingface_hub's own lookup, with the hub never contacted.

    Raises:
        FileNotFoundError: neither a folder nor a cached repo; the message says which command fetches it.
    """
    path = Path(ref).expanduser()
    if path.exists() or not REPO_ID.match(str(ref)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(str(ref), local_files_only=True))  # the cache's snapshot of refs/main
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{ref} is neither a folder nor in the local Hugging Face cache ({constants.HF_HUB_CACHE}). "
            f"On a machine with internet: `hf download {ref}` (into that cache; copy it here if needed) "
            f"or `hf download {ref} --local-dir <dir>` and give <dir>") from None


def model_path(params: dict) -> Path:
    """The folder a profile's model loads from: ``$SAAM_MODEL_PATH``, else the profile's
    ``model_path``, else (real models) its ``model_id``; each a folder or a Hugging Face repo id in
    the local cache (:func:`resolve`). Stops at once if it is absent, incomplete or of another model
    family than the profile's."""
    if params.get("model", "shapesworld") == "shapesworld":
        if os.environ.get("SAAM_MODEL_PATH"):
            raise ValueError(f"SAAM_MODEL_PATH is set ({os.environ['SAAM_MODEL_PATH']!r}), but profile "
                             f"{params['profile']!r} runs a ShapesWorld organism, which it would not change: name the "
                             "organism's folder with SET='model_path=<dir>' (its outputs then go to a folder of their "
                             "own), or unset SAAM_MODEL_PATH")
        path = resolve(params.get("model_path") or paths.MODEL_DIR)
        path = path if path.is_absolute() else paths.ROOT / path
        check_organism_folder(path)
        return path
    model = params["model"]
    ref = os.environ.get("SAAM_MODEL_PATH") or params.get("model_path") or params.get("model_id")
    if not ref:
        raise FileNotFoundError(f"profile {params['profile']!r} names no model: set model_path or model_id, "
                                "or SAAM_MODEL_PATH")
    try:
        path = resolve(ref)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"profile {params['profile']!r} needs the weights of {params.get('model_id') or model}: {e}; "
                                f"then `make all PROFILE={params['profile']} "
                                "SAAM_MODEL_PATH=<dir or id>` (a GPU is strongly advised)") from None
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"profile {params['profile']!r} needs the weights of {params.get('model_id') or model} as a diffusers "
            f"folder or a cached Hugging Face repo id, and {str(ref)!r} is neither (no model_index.json). On a "
            f"machine with internet: `hf download {params.get('model_id') or model} --local-dir <dir>`, then "
            f"`make all PROFILE={params['profile']} SAAM_MODEL_PATH=<dir>` (a GPU is strongly advised).")
    check_model_folder(path, model, params["profile"])
    return path


def family_of(path: Path) -> str | None:
    """The profile key (``sd14``, ``sd21``, ``sdxl``, ``sd3``, ``sd35``, ``flux``) of a diffusers
    folder's model family, ``shapesworld`` for an organism, or None for a family we do not know."""
    import json
    if any((Path(path) / f).exists() for f in ("saam.json", "training.json")):  # what our organisms' folders carry
        return "shapesworld"
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
        config = json.loads((Path(path) / denoiser_name(index) / "config.json").read_text())
    except (OSError, ValueError, AttributeError) as e:  # a missing or broken config: say which file
        what = getattr(e, "filename", None) or "model_index.json or the denoiser's config.json"
        raise ValueError(f"{path}: cannot tell the model family: {what} is missing or not valid JSON "
                         f"({type(e).__name__}); a diffusers folder has model_index.json and unet/ or "
                         "transformer/ with config.json and weights") from None
    got = model_family(index, config)
    return next((k for k, v in FAMILIES.items() if v == got), None)


def share_cores(device: str) -> None:
    """On the CPU under ``accelerate launch`` (``make all PROCESSES=n``), each of the n processes
    computes on its share of the cores (torch would otherwise start as many threads as there are
    cores in every process, and the processes would fight over them)."""
    from .runs import processes
    world = processes()[1]
    if device == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16; Linux's /proc/cpuinfo flags) and
    torch may use those instructions (its kernels at AVX512: ``ATEN_CPU_CAPABILITY=avx2`` keeps them
    off, as on an AVX2-only CPU; docs/performance.md uses that to measure such a machine's times)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return (" amx_bf16" in flags or " avx512_bf16" in flags) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def machine() -> dict:
    """What a measured time ran on, as every quoted time names it: the CPU's model name
    (/proc/cpuinfo), torch's CPU capability (``AVX2`` where torch is held there), whether bf16 is
    native (:func:`cpu_has_bf16`), the cores and the CUDA device, if any."""
    import platform
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), platform.processor() or "unknown")
    return dict(cpu=cpu, capability=torch.backends.cpu.get_cpu_capability(), bf16=cpu_has_bf16(),
                cores=os.cpu_count(), cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def guidance_arg(guidance: float | None) -> dict:
    """A pipeline call's guidance argument: ``guidance_scale=guidance``, or none where a profile says
    ``guidance: null`` (the pipeline's own: Qwen-Image has no guidance input, and its true CFG needs a
    negative prompt; handed a scale, it warns at every call that it ignores it)."""
    return {} if guidance is None else {"guidance_scale": guidance}


def precision(params: dict) -> str:
    """The arithmetic a profile's UNet runs in: ``fp16`` on CUDA (weights in half precision);
    on the CPU ``bf16`` (weights in fp32, the UNet under ``torch.autocast`` in bfloat16) where the
    profile says so or, with ``precision: auto``, where the CPU has native bf16 instructions;
    else ``fp32``. It is part of every cache key."""
    device, _ = resolve_device(params.get("device", "auto"))
    if device.startswith("cuda"):
        return "fp16"
    want = params.get("precision", "auto")
    return "bf16" if want == "bf16" or (want == "auto" and cpu_has_bf16()) else "fp32"


def _autocast(forward, dtype: torch.dtype, out: torch.dtype | None = None, text: bool = False):
    def run(*args, **kwargs):
        if text:  # the text states in ``dtype`` once per call: autocast casts them again at every to_k / to_v
            if "encoder_hidden_states" in kwargs:
                kwargs["encoder_hidden_states"] = _low(kwargs["encoder_hidden_states"], dtype)
            elif len(args) > 2:
                args = (*args[:2], _low(args[2], dtype), *args[3:])
        with torch.autocast("cpu", dtype=dtype):
            y = forward(*args, **kwargs)
        if out is not None:  # the prediction back in ``out`` (a flow-matching step keeps the model output's dtype)
            if isinstance(y, tuple):
                return tuple(t.to(out) if torch.is_tensor(t) and t.is_floating_point() else t for t in y)
            y.sample = y.sample.to(out)
        return y
    return run


def _low(t, dtype: torch.dtype):
    return t.to(dtype) if torch.is_tensor(t) and t.dtype == torch.float32 else t


def denoiser(pipe):
    """The pipeline's denoiser: its UNet, or (DiTs) its transformer."""
    from .family import of
    return of(pipe).denoiser(pipe)


def autocast_bf16(unet) -> None:
    """The UNet (or MM-DiT) under ``torch.autocast`` in bfloat16 on the CPU, its linear and convolution weights
    stored in bfloat16 once: autocast casts exactly these to bfloat16 at every call (measured on
    organism D: 12,900 casts per 16-image, 30-step batch, 13 % of its time), so storing them so
    gives the same numbers, bit for bit (tested), without the casts. Norms stay in fp32.

    Likewise a UNet's text states: in a UNet that reads them only through its cross-attention key
    and value projections (no ``norm_cross``, added key/value projections, ``encoder_hid_proj`` or
    "text" addition embedding, each of which would see them in float32), autocast cast them to
    bfloat16 at each of those (22 casts per step on the organism, 3 % of its time); they are cast
    once per call instead, the same numbers (tested)."""
    from .family import of_model
    fam = of_model(unet)
    dit = fam.dit
    for m in unet.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(torch.bfloat16)
    text = (not dit and not fam.projects_context and getattr(unet, "encoder_hid_proj", None) is None
            and unet.config.get("addition_embed_type") in (None, "text_time")  # "text" normalises them
            and not any(getattr(m, "norm_cross", None) is not None or getattr(m, "add_k_proj", None) is not None
                        for m in unet.modules() if hasattr(m, "to_k")))
    # an MM-DiT's prediction comes back in float32: its pipelines' flow-matching step would keep the
    # latents in bfloat16 otherwise, and the VAE (float32) refuses them
    unet.forward = _autocast(unet.forward, torch.bfloat16, torch.float32 if fam.fp32_output else None, text=text)


def load_model(params: dict, path: Path | None = None):
    """The pipeline a profile names (or the folder ``path``, already checked), on
    ``params['device']`` (default auto), in the profile's :func:`precision`, progress bars off."""
    device, dtype = resolve_device(params.get("device", "auto"))
    path = model_path(params) if path is None else Path(path)
    share_cores(device)
    with quiet():
        if params.get("model", "shapesworld") == "shapesworld":
            from .shapes.model import load_pipeline, variant_of
            if variant_of(path)["variant"] == "mmdit":  # the MM-DiT organism (saam.shapes.dit)
                from .shapes.dit import load
                pipe = load(path, device=device)
            else:
                pipe = load_pipeline(path, device=device)  # fp32: the organism is small
        else:
            from diffusers import DiffusionPipeline
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
            pipe = pipe.to(device)
    import logging
    from .family import of
    for name in of(pipe).quiet_loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    if precision(params) == "bf16":  # the UNet's matmuls and convolutions in bf16, its sums and softmax in fp32
        autocast_bf16(denoiser(pipe))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def data_dir(params: dict) -> Path | None:
    """The profile's evaluation dataset (``data_dir``, or $SAAM_DATA), if any."""
    d = os.environ.get("SAAM_DATA") or params.get("data_dir")
    if not d:
        return None
    d = Path(d) if Path(d).is_absolute() else paths.ROOT / d
    if not d.is_dir():
        raise FileNotFoundError(f"evaluation data folder {d} does not exist (profile key data_dir or $SAAM_DATA)")
    return d


def _signature(folder: Path) -> tuple:
    """What a folder's files are, cheaply: (name, size, mtime) of each (a stat per file, no reading)."""
    return tuple((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                 for f in sorted(folder.rglob("*")) if f.is_file())


@lru_cache(maxsize=None)
def _config(folder: Path, signature: tuple) -> dict:
    import json
    return json.loads((folder / denoiser_name(json.loads((folder / "model_index.json").read_text())) / "config.json").read_text())


@lru_cache(maxsize=None)
def _fingerprint(folder: Path, signature: tuple) -> str:
    from .cache import fingerprint
    return fingerprint(folder)


def denoiser_config(params: dict) -> dict:
    """The profile's UNet (or MM-DiT) config, read once per run (again only if the folder's files change)."""
    folder = model_path(params)
    return _config(folder, _signature(folder))


def model_fingerprint(params: dict) -> str:
    """Hash of the profile's weights and configs (``cache.fingerprint``), computed once per run
    (again only if the folder's files change): what every cache key of the model's results holds."""
    folder = model_path(params)
    return _fingerprint(folder, _signature(folder))


@lru_cache(maxsize=None)
def _text_fingerprint(folder: Path, signature: tuple) -> str:
    from .cache import digest, fingerprint
    return digest({d.name: fingerprint(d) for d in sorted(folder.iterdir())
                   if d.is_dir() and d.name.startswith(("text_encoder", "tokenizer"))})


def text_fingerprint(params: dict) -> str:
    """Hash of the profile's text encoder(s) and tokenizer(s) alone: what encoded words depend on
    (the ShapesWorld organisms share theirs, so their relevance passes share the encoded concepts)."""
    folder = model_path(params)
    return _text_fingerprint(folder, _signature(folder))
