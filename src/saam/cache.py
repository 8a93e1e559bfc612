"""Content-keyed, atomically written artefacts under ``data/cache``.

An artefact's key is a hash of everything that produced it (parameters, model fingerprint,
package version), and a JSON sidecar records those inputs. Writes go to a temporary file that
is renamed into place, so an interrupted run never leaves a half-written artefact behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

from . import paths


def key(params: dict) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint(path: Path) -> str:
    """Hash of a model folder's weights and configs (what a cached result depends on)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".txt", ".bin"):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cached(name: str, params: dict, compute: Callable[[], Any], root: Path | None = None,
           refresh: bool = False) -> Any:
    """Return the artefact for (name, params), computing and storing it if absent."""
    root = Path(root or paths.CACHE)
    k = key(params)
    f = root / name / f"{k}.pkl"
    if f.exists() and not refresh:
        with open(f, "rb") as fh:
            return pickle.load(fh)
    value = compute()
    atomic_write(f, pickle.dumps(value))
    atomic_write(f.with_suffix(".json"), json.dumps(params, indent=1, sort_keys=True, default=str).encode())
    return value
