"""A smoke-sized run of the generating steps (relevance votes, traced records, Table 1), for the
several-process test: ``accelerate launch --cpu --num_processes 2 tests/sharded_run.py OUT`` must
write what ``python tests/sharded_run.py OUT`` writes. Rank 0 writes OUT."""
import hashlib
import json
import os
import sys

import numpy as np
import torch

torch.set_num_threads(1)


def main(out: str) -> None:
    from saam import chapter, models, steps, tables
    from saam.evaluate import miou_table
    from saam.runs import processes
    p = chapter.load("smoke", "steps=2 n_eval=4 n_relevance_prompts=6 batch_size=2")
    pipe = models.load_model(p)
    rel = steps.relevance(pipe, p)
    recs, _, _ = steps.records(pipe, p, "generation", rel.heads)
    table = miou_table(tables.score(recs, rel, p))
    maps = hashlib.sha256(b"".join(np.ascontiguousarray(r.maps).tobytes() for r in recs)).hexdigest()
    from saam.runs import GENERATED
    with open(f"{out}.rank{processes()[0]}", "w") as f:  # the batches this process generated, counted
        json.dump(GENERATED, f)
    if processes()[0] == 0:
        with open(out, "w") as f:
            json.dump(dict(votes=rel.prompt_votes.tolist(), records=len(recs), maps=maps,
                           table=table.round(12).to_dict("records"), world=processes()[1]), f)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
