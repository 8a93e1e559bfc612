"""Content-keyed, atomically written artefacts under ``data/cache``, stored as data, not pickles.

An artefact's key is a hash of everything that produced it: parameters, the model's weight
fingerprint, and the source of the package code it ran (found automatically: the modules it names
and everything they import from the package). A JSON sidecar records those inputs. Values are
stored as one ``.npz`` (every array) plus a JSON tree (everything else): loading one never runs
code, unlike a pickle from a shared cache folder. Writes go to a temporary file renamed into
place; an entry that is truncated or unreadable anyway is reported by name and recomputed.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import io
import json
import os
import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import paths

PACKAGE = Path(__file__).resolve().parent


def key(params: dict) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


CHUNK = 8 << 20  # bytes read at a time when hashing a file: memory stays flat for a 10 GB weight file


def file_digest(f: Path) -> bytes:
    """SHA-256 of a file's content, read in :data:`CHUNK`-byte pieces (never the whole file at once)."""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.digest()


def _digests_file() -> Path:
    return paths.CACHE / "file-digests.json"


@lru_cache(maxsize=None)
def _known_digests(where: Path) -> dict:
    try:
        return json.loads(where.read_text())
    except (OSError, ValueError):
        return {}


def known_digest(f: Path) -> bytes:
    """:func:`file_digest`, remembered under ``data/cache/file-digests.json`` by (resolved path, size,
    modification time, inode, status-change time): a weight file is hashed once, not once per
    chapter and run; a file that changed is hashed again. The status-change time (ctime) moves with
    every write, rename or ``touch`` and cannot be set back, so weights swapped for others of the
    same size with their old modification time restored are hashed again too."""
    f = Path(f).resolve()
    st = f.stat()
    k = f"{f}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    where = _digests_file()
    known = _known_digests(where)
    if k not in known:
        known[k] = file_digest(f).hex()
        try:
            atomic_write(where, json.dumps(known, indent=0, sort_keys=True).encode())
        except OSError:
            pass  # a read-only cache folder: hash again next time
    return bytes.fromhex(known[k])


def fingerprint(path: Path) -> str:
    """Hash of a model folder's weights and configs (what a cached result depends on): each file's
    relative path and content hash (:func:`known_digest`: streamed, and remembered per file)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".txt", ".bin"):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(known_digest(f))
    return h.hexdigest()[:16]


def _walk(tree):
    """Every node of ``tree`` but the bodies of ``if TYPE_CHECKING:`` (imports that never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


@lru_cache(maxsize=None)
def _imports(module: str) -> frozenset[str]:
    """Package modules that ``module`` (dotted, relative to the package) imports, anywhere in it."""
    f = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    if not f.exists():
        f = PACKAGE.joinpath(*module.split("."), "__init__.py")
    base = module.split(".")[:-1]
    out = set()
    for node in _walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parent = base[: len(base) - node.level + 1]
            mod = ".".join(parent + (node.module.split(".") if node.module else []))
            names = [mod] if node.module else [".".join(parent + [a.name]) for a in node.names]
            for n in names:
                if PACKAGE.joinpath(*n.split(".")).with_suffix(".py").exists():
                    out.add(n)
    return frozenset(out)


def closure(*modules: str) -> list[str]:
    """``modules`` and every package module they import, transitively (lazy imports included)."""
    seen, todo = set(), list(modules)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _imports(m)
    return sorted(seen)


def module_file(module: str) -> Path:
    """The source file of a package module (dotted, relative to the package)."""
    return PACKAGE.joinpath(*module.split(".")).with_suffix(".py")


def code_fingerprint(*modules: str) -> str:
    """Hash of the source of ``modules`` and of every package module they import, transitively.

    Editing any code a cached step ran invalidates it; editing code it never touches does not.
    """
    h = hashlib.sha256()
    for m in closure(*modules):
        h.update(m.encode() + module_file(m).read_bytes())
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


# --------------------------------------------------------------------------- data codec

def _encode(obj, arrays: list) -> Any:
    import pandas as pd
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError("cannot cache an object array (it would need a pickle)")
        arrays.append(obj)
        return {"__array__": len(arrays) - 1}
    if isinstance(obj, pd.DataFrame):
        cols = {c: obj[c].to_numpy() for c in obj.columns}
        cols = {c: v.tolist() if v.dtype == object else v for c, v in cols.items()}  # strings, mixed
        return {"__frame__": _encode(cols, arrays)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith(__package__):
            raise TypeError(f"cannot cache {cls.__module__}.{cls.__name__}: only this package's dataclasses")
        fields = {f.name: _encode(getattr(obj, f.name), arrays) for f in dataclasses.fields(obj)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple (HeadId)
        cls = type(obj)
        return {"__namedtuple__": f"{cls.__module__}:{cls.__qualname__}", "items": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, arrays) for k, v in obj.items()}}
        return {"__items__": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot cache a {type(obj).__name__}")


def _class(ref: str):
    mod, name = ref.split(":")
    if not mod.startswith(__package__):
        raise ValueError(f"refusing to load {ref}: not a class of this package")
    return getattr(importlib.import_module(mod), name)


def _decode(node, arrays) -> Any:
    import pandas as pd
    if not isinstance(node, dict):
        return node
    if "__array__" in node:
        return arrays[f"a{node['__array__']}"]
    if "__frame__" in node:
        return pd.DataFrame(_decode(node["__frame__"], arrays))
    if "__dataclass__" in node:
        return _class(node["__dataclass__"])(**{k: _decode(v, arrays) for k, v in node["fields"].items()})
    if "__namedtuple__" in node:
        return _class(node["__namedtuple__"])(*[_decode(v, arrays) for v in node["items"]])
    if "__dict__" in node:
        return {k: _decode(v, arrays) for k, v in node["__dict__"].items()}
    if "__items__" in node:
        return {_decode(k, arrays): _decode(v, arrays) for k, v in node["__items__"]}
    if "__list__" in node:
        return [_decode(v, arrays) for v in node["__list__"]]
    if "__tuple__" in node:
        return tuple(_decode(v, arrays) for v in node["__tuple__"])
    raise ValueError(f"unknown node {list(node)[:3]}")


def dumps(value) -> bytes:
    """One ``.npz`` holding every array of ``value`` and, as ``tree.json``, the rest."""
    arrays: list = []
    tree = _encode(value, arrays)
    buf = io.BytesIO()
    np.savez_compressed(buf, **{f"a{i}": a for i, a in enumerate(arrays)},
             tree=np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8))
    return buf.getvalue()


def digest(value) -> str:
    """A content hash of a value ``dumps`` can store (arrays by dtype, shape and bytes)."""
    arrays: list = []
    tree = _encode(value, arrays)
    h = hashlib.sha256(json.dumps(tree, sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def loads(data: bytes):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return _decode(json.loads(arrays.pop("tree").tobytes()), arrays)


def cached(name: str, params: dict, compute: Callable[[], Any], root: Path | None = None,
           refresh: bool = False) -> Any:
    """Return the artefact for (name, params), computing and storing it if absent or unreadable."""
    root = Path(root or paths.CACHE)
    k = key(params)
    f = root / name / f"{k}.npz"
    if f.exists() and not refresh:
        try:
            return loads(f.read_bytes())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            print(f"cache entry {f} is unreadable ({type(e).__name__}: {e}); recomputing it", file=sys.stderr)
    value = compute()
    atomic_write(f, dumps(value))
    atomic_write(f.with_suffix(".json"), json.dumps(params, indent=1, sort_keys=True, default=str).encode())
    return value
