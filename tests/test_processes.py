"""Several processes: `accelerate launch --multi_gpu --num_processes 2` (torchrun; on a machine without
GPUs the processes meet over gloo on the CPU: accelerate 1.15's `--cpu` starts one process only) splits
the generating steps' batches between two processes through the shared cache and gives what one
process gives."""
import json
import os
import subprocess
import sys

import pytest

from saam import paths

JOB = str(paths.ROOT / "tests" / "sharded_run.py")


def _run(cmd, cache, tmp_path):
    env = dict(os.environ, SAAM_CACHE=str(cache), SAAM_FIGURES=str(tmp_path / "figures"), HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_give_what_one_gives(tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run([sys.executable, JOB, str(tmp_path / "one.json")], tmp_path / "cache1", tmp_path)
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", JOB, str(tmp_path / "two.json")], tmp_path / "cache2", tmp_path)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["world"] == 1 and two["world"] == 2
    # each process made half the batches: the two caches hold the same entries
    n1 = sorted(f.name for f in (tmp_path / "cache1").rglob("*.npz"))
    n2 = sorted(f.name for f in (tmp_path / "cache2").rglob("*.npz"))
    assert n1 == n2 and n1
    assert one["records"] > 0 and one["votes"] == two["votes"] and one["maps"] == two["maps"]
    assert one["table"] == two["table"]
    # counted, not inferred from equal outputs: each process generated only its share of the batches
    alone = json.loads((tmp_path / "one.json.rank0").read_text())
    r0, r1 = (json.loads((tmp_path / f"two.json.rank{r}").read_text()) for r in (0, 1))
    assert alone and set(r0) | set(r1) == set(alone)
    for name, n in alone.items():
        assert r0.get(name, 0) + r1.get(name, 0) == n, name  # no batch made twice
        assert r0.get(name, 0) >= r1.get(name, 0) >= 1, (name, r0, r1)  # rank r makes batches r, r + 2, ...


def test_a_process_outside_its_group_is_refused():
    """RANK / WORLD_SIZE say rank 1 of 2, but the group it joined is one process: it would redo rank
    0's batches and write rank 0's outputs; refused before any work."""
    from types import SimpleNamespace
    from saam.runs import check_group
    check_group(SimpleNamespace(process_index=1, num_processes=2), 1, 2)
    for state in (SimpleNamespace(process_index=0, num_processes=1), SimpleNamespace(process_index=0, num_processes=2)):
        with pytest.raises(RuntimeError, match="would duplicate another rank's work"):
            check_group(state, 1, 2)


def test_other_ranks_write_beside_the_chapter_not_under_notebooks(monkeypatch, tmp_path):
    """Under `accelerate launch` rank 1's chapter and figures go to ``<outdir>/rank1/``, an absolute
    path: the kernel runs in ``notebooks/``, where a relative one once landed (``notebooks/build/``)."""
    sys.path.insert(0, str(paths.ROOT / "scripts"))
    from pathlib import Path
    from run_notebook import destination
    monkeypatch.chdir(tmp_path)
    chapter = Path("build/paper/03-miou.ipynb")
    assert destination(chapter, 0) == (chapter, None)
    dst, figures = destination(chapter, 1)
    assert dst == tmp_path / "build/paper/rank1/03-miou.ipynb" and figures == tmp_path / "build/paper/rank1/figures"
