"""The cache stores data (no pickles), survives a broken entry, and follows the code it ran."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saam import cache
from saam.evaluate import WordRecord
from saam.heads import HeadId
from saam.relevance import Relevance


def _value():
    rel = Relevance(["Color", "Shape"], [HeadId("down_blocks.0.a", 0), HeadId("up_blocks.1.a", 3)],
                    np.eye(2, dtype=np.float32), np.ones((3, 2, 2), np.int64), [999, 500, 1], {"n": 3}, None)
    rec = WordRecord(0, "a red circle", "red", 0, "color", 0, np.zeros((4, 4), bool), np.ones((2, 2, 2), np.float16),
                     1, np.bool_(True))
    return dict(rel=rel, records=([rec, rec], np.zeros((2, 4, 4, 3), np.uint8)),
                table=pd.DataFrame(dict(head=["a", "b"], share=[0.5, 0.25])), n=np.int64(3), text="x", none=None)


def test_roundtrip_without_pickle(tmp_path):
    v = _value()
    out = cache.loads(cache.dumps(v))
    assert out["rel"].heads == v["rel"].heads and isinstance(out["rel"].heads[0], HeadId)
    np.testing.assert_array_equal(out["rel"].votes, v["rel"].votes)
    (r, _), images = out["records"][0], out["records"][1]
    assert r.word == "red" and r.bound is True and r.maps.dtype == np.float16 and images.shape == (2, 4, 4, 3)
    pd.testing.assert_frame_equal(out["table"], v["table"])
    assert out["n"] == 3 and out["none"] is None
    with pytest.raises(TypeError, match="cannot cache"):
        cache.dumps(object())


def test_broken_entry_is_named_and_recomputed(tmp_path, capsys):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(3)}
    cache.cached("x", {"p": 1}, compute, root=tmp_path)
    f = next((tmp_path / "x").glob("*.npz"))
    for broken in (f.read_bytes()[:20], b""):
        f.write_bytes(broken)
        np.testing.assert_array_equal(cache.cached("x", {"p": 1}, compute, root=tmp_path)["a"], np.arange(3))
        assert str(f) in capsys.readouterr().err
    assert len(calls) == 3
    cache.cached("x", {"p": 1}, compute, root=tmp_path)
    assert len(calls) == 3  # a good entry is reused


def test_code_fingerprint_follows_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f(): return 1\n")
    (pkg / "c.py").write_text("x = 1\n")
    (pkg / "sub" / "d.py").write_text("from ..c import x\n")
    monkeypatch.setattr(cache, "PACKAGE", pkg)
    cache._imports.cache_clear()
    a0, d0 = cache.code_fingerprint("a"), cache.code_fingerprint("sub.d")
    (pkg / "b.py").write_text("def f(): return 2\n")
    cache._imports.cache_clear()
    assert cache.code_fingerprint("a") != a0 and cache.code_fingerprint("sub.d") == d0
    (pkg / "c.py").write_text("x = 2\n")
    assert cache.code_fingerprint("sub.d") != d0
    cache._imports.cache_clear()


def test_the_package_has_no_import_circle_and_no_hub():
    """No module imports one that imports it back, at any depth, lazy imports and type-only imports
    (``if TYPE_CHECKING:``) included; no module imports more than half of the others."""
    import ast
    mods = [".".join(p.relative_to(cache.PACKAGE).with_suffix("").parts) for p in cache.PACKAGE.rglob("*.py")
            if p.name != "__init__.py"]
    graph = {m: cache._imports(m) for m in mods}
    assert "capture" in graph["analyses"]  # the walker does see lazy imports (polysemy's, inside the function)
    for m in mods:  # what the fingerprints skip (type-only imports) counts for circles
        tree = ast.parse(cache.PACKAGE.joinpath(*m.split(".")).with_suffix(".py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
                raise AssertionError(f"{m} has a type-only import block: a circle the import graph would not show")
    hubs = {m: len(d) for m, d in graph.items() if len(d) > (len(mods) - 1) / 2}
    assert not hubs, f"modules importing more than half of the others: {hubs}"
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in graph.get(m, ()):
            visit(n)
        path.pop()
        done.add(m)
    for m in mods:
        visit(m)


def test_fingerprint_streams_and_remembers_each_file(tmp_path, monkeypatch):
    """The same fingerprint as hashing each file whole; each file hashed once per (path, size,
    mtime), in chunks; a changed file is hashed again and changes the fingerprint."""
    import hashlib
    import os
    from saam import cache, paths
    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(cache, "CHUNK", 7)  # several chunks per file
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text('{"a": 1}')
    (folder / "unet" / "w.safetensors").write_bytes(bytes(range(256)) * 3)
    (folder / "notes.md").write_text("not hashed")

    def whole(path):
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".json", ".txt", ".bin"):
                h.update(f.relative_to(path).as_posix().encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()[:16]
    reads = []
    real = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda f: reads.append(Path(f).name) or real(f))
    first = cache.fingerprint(folder)
    assert first == whole(folder) and sorted(reads) == ["config.json", "w.safetensors"]
    assert cache.fingerprint(folder) == first and len(reads) == 2  # remembered: nothing read again
    assert len(json.loads((tmp_path / "cache" / "file-digests.json").read_text())) == 2
    w = folder / "unet" / "w.safetensors"
    w.write_bytes(bytes(range(255, -1, -1)) * 3)
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert cache.fingerprint(folder) == whole(folder) != first and reads.count("w.safetensors") == 2
    # weights swapped for others of the same size, the old modification time restored (issue 37)
    second, st = cache.fingerprint(folder), w.stat()
    (folder / "other").write_bytes(bytes(range(256)) * 3)
    os.replace(folder / "other", w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_size == st.st_size and w.stat().st_mtime_ns == st.st_mtime_ns
    assert cache.fingerprint(folder) == whole(folder) == first != second and reads.count("w.safetensors") == 3
