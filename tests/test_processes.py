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
