"""Where grounding lives on an MM-DiT, on records whose answer is known: oracle-k in output space
(head-wise ConceptAttention's bound) and the per-block scores of both spaces (``analyses.blocks``)."""
import numpy as np
import pytest

from saam.evaluate import WordRecord
from saam.heads import HeadId

LAYERS = [f"transformer_blocks.{b}.attn" for b in range(3)]
HEADS = [HeadId(l, h) for l in LAYERS for h in range(2)]  # 3 joint blocks of 2 heads


def _quadrant(i):
    m = np.zeros((8, 8), bool)
    m[(i // 2) * 4:(i // 2) * 4 + 4, (i % 2) * 4:(i % 2) * 4 + 4] = True
    return m


def _records(n=8):
    """Each word's object in a quadrant; in attention only head 5 (block 2) finds it, in output
    space only head 1 (block 0) and, block by block, only block 1's ConceptAttention map."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        gt = _quadrant(i % 4)
        noise = lambda k: rng.random((k, 8, 8)).astype(np.float32) * 0.5  # noqa: E731
        maps, heads_out, blocks = noise(len(HEADS)), noise(len(HEADS)), noise(len(LAYERS))
        maps[5] += 2 * gt
        heads_out[1] += 2 * gt
        blocks[1] += 2 * gt
        out.append(WordRecord(i, "a red circle", "red", 0, "color", 0, gt, maps, output=blocks[2], output_heads=heads_out,
                              output_blocks=blocks, output_layers=tuple(LAYERS)))
    return out


class Rel:
    heads = HEADS

    def row(self, kind):
        return np.array([0, 0, 5, 4, 1, 0], float)  # relevance puts the colour's top heads in block 1


def test_oracle_k_in_output_space_picks_the_heads_whose_own_output_maps_find_the_object():
    from saam.selection import oracle_ious, word_ious
    recs, mask = _records(), np.ones(len(HEADS), bool)
    att, att_sets = oracle_ious(recs, HEADS, 1, 0.4, mask)
    out, out_sets = oracle_ious(recs, HEADS, 1, 0.4, mask, space="output")
    assert {int(s[0]) for s in att_sets.values()} == {5} and {int(s[0]) for s in out_sets.values()} == {1}
    assert min(att.values()) == 1.0 and min(out.values()) == 1.0
    assert (word_ious(recs, [[5]], len(HEADS), 0.4, space="output") < 1).all()  # head 5 finds nothing in output space
    with pytest.raises(ValueError, match="MM-DiT"):
        oracle_ious([WordRecord(0, "x", "red", 0, "color", 0, recs[0].gt, recs[0].maps)] * 2, HEADS, 1, 0.4, mask,
                    space="output")


def test_blocks_score_each_block_in_both_spaces_and_mark_conceptattentions():
    from saam.analyses import blocks, blocks_lines
    df = blocks(_records(), Rel(), np.ones(len(HEADS), bool), 2, 0.4)
    assert set(df.kind) == {"color", "pooled"} and len(df) == 2 * len(LAYERS) * 2
    c = df[df.kind == "color"].set_index(["space", "block"])
    assert c.loc[("attention", 2), "mIoU"] == c[c.index.get_level_values(0) == "attention"].mIoU.max()
    assert c.loc[("output", 1), "mIoU"] == 1.0 and c.loc[("output", 0), "mIoU"] < 1.0
    assert c.xs("attention").concept_block.tolist() == [False, False, True]  # 3 joint blocks: the last one
    assert c.xs("attention").top_share.tolist() == [0.0, 1.0, 0.0]  # top-2 by relevance: heads 2 and 3, block 1
    assert c.xs("attention").relevance.tolist() == [0.0, 4.5, 0.5]
    text = " ".join(blocks_lines(df))
    assert "in output space block 1 (1.000" in text and "top-k heads sit in blocks 1 (100%)" in text
    unet = [WordRecord(0, "x", "red", 0, "color", 0, r.gt, r.maps) for r in _records(2)]
    assert blocks(unet, Rel(), np.ones(len(HEADS), bool), 2, 0.4).empty  # no output space: nothing to say


def test_the_readme_answer_states_the_mmdit_verdicts_from_its_results():
    """The README's second organism is read off the mmdit profile's results.json: per kind, top-k's
    verdict, ConceptAttention against the cross-attention average (called from its paired CI), the
    oracles and the best blocks; change a number and the sentence follows."""
    import importlib.util
    from saam import paths
    spec = importlib.util.spec_from_file_location("readme_results", paths.ROOT / "scripts" / "readme_results.py")
    rr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rr)
    verdict = lambda d, call: dict(diff=d, ci_low=d - 0.02, ci_high=d + 0.02, call=call)  # noqa: E731
    m = lambda v, d=None: dict(miou=v, miou_ci=[v - 0.05, v + 0.05], **({} if d is None else dict(diff=d, diff_ci=[d - 0.03, d + 0.03])))  # noqa: E731
    res = dict(table1=dict(n_words=90, miou_daam=0.3, miou_oracle=0.4, miou_oracle_output=0.35,
                           by_kind={"color": dict(daam=m(0.3), output=m(0.2, -0.1), output_top=m(0.25, -0.05)),
                                    "shape": dict(daam=m(0.3), output=m(0.31, 0.01), output_top=m(0.33, 0.03))}),
               verdict=dict(table1=verdict(0.01, "not distinguishable"),
                            table1_by_kind={"color": verdict(-0.05, "worse"), "shape": verdict(0.05, "better")}),
               blocks={"pooled/0/attention": dict(miou=0.2, concept_block=False), "pooled/1/attention": dict(miou=0.25, concept_block=True),
                       "pooled/0/output": dict(miou=0.3, concept_block=False), "pooled/1/output": dict(miou=0.1, concept_block=True)})
    text = rr.dit_answer(res)
    assert "color words -0.050 [-0.070, -0.030], **worse**" in text and "shape words +0.050" in text
    assert "color 0.200 against 0.300, -0.100 [-0.130, -0.070], **worse**" in text
    assert "shape 0.310 against 0.300, +0.010 [-0.020, +0.040], **not distinguishable**" in text
    assert "0.400 in cross-attention and 0.350 in output space" in text
    assert "cross-attention is best in block 1 (0.250), the output space in block 0 (0.300)" in text
    assert "ConceptAttention averages blocks 1." in text
