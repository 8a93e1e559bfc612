"""The head explorer: the JupyterLab widget (controls redraw it) and the static page (clicking a
word changes the grid, in headless Chromium), on the smoke profile's cached organism run."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def run(smoke_run):
    return smoke_run


def test_heads_are_ordered_by_relevance_with_their_own_iou(run):
    from saam import tables
    from saam.evaluate import mask_ious
    from saam.explorer import heads_of
    p, rel, recs, images = run
    r = next(r for r in recs if r.gt is not None)
    mask = tables.eligible(p, rel.heads)
    t = heads_of(r, rel, r.kind, mask, p["tau"])
    assert len(t) == mask.sum() and t.relevance.is_monotonic_decreasing and list(t["rank"]) == list(range(1, len(t) + 1))
    h = t.iloc[3]
    assert h.iou == mask_ious(r.maps[[h["index"]]], r.gt, [p["tau"]])[0, 0]


def test_the_widget_redraws_when_a_control_changes(run):
    from saam.explorer import Explorer
    p, rel, recs, images = run
    e = Explorer(recs, rel, images, p)
    first = e.shown
    png = bytes(e.view.value)
    assert first[0] == recs[0].image and png.startswith(b"\x89PNG")  # a figure drawn
    e.k.value = 0.5
    assert e.shown == (*first[:3], 0.5) and bytes(e.view.value) != png
    e.concept.value = "Shape" if first[2] != "Shape" else "Color"
    assert e.shown[2] == e.concept.value
    other = [i for i in e.by_image if i != first[0]][0]
    e.image.value = other
    assert e.shown[0] == other and e.shown[1] == e.by_image[other][0].word
    e.word.value = len(e.by_image[other]) - 1
    assert e.shown[1] == e.by_image[other][-1].word


@pytest.mark.slow
def test_the_static_page_switches_words_in_chromium(run, tmp_path):
    from saam.explorer import write_page
    p, rel, recs, images = run
    page = write_page(tmp_path / "explorer.html", recs, rel, images, p, n_images=2)
    from conftest import chromium
    drv = chromium()
    try:
        drv.get(page.as_uri())
        grid = lambda: drv.execute_script("const g = document.querySelector('#img0 .grid'); "  # noqa: E731
                                          "return [g.dataset.word, Array.from(g.querySelectorAll('img')).map(i => i.src)]")
        word0, srcs0 = grid()
        buttons = drv.find_elements("css selector", "#img0 .words button")
        assert len(buttons) >= 2 and word0 == buttons[0].text.split(" ")[0]
        buttons[1].click()
        word1, srcs1 = grid()
        assert word1 == buttons[1].text.split(" ")[0] and word1 != word0 and srcs1 != srcs0
        assert len(srcs1) == int(drv.execute_script("return document.getElementById('k').max"))  # every eligible head
        tops = lambda: drv.execute_script("return document.querySelectorAll('#img0 .grid figure.top').length")  # noqa: E731
        k0 = tops()
        drv.execute_script("const s = document.getElementById('k'); s.value = 1; s.dispatchEvent(new Event('input'))")
        assert k0 > 1 and tops() == 1
        widths = drv.execute_script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        assert widths and all(w > 0 for w in widths)
        assert not [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        drv.quit()


HOSTILE = '</script><img src=x onerror="window.pwned=1">"\' onmouseover="window.pwned=2" `${window.pwned=3}` __DATA__'


def _hostile(run):
    """The smoke run with a hostile string in every head (layer) name, word and caption, as a shared
    relevance file or a user's prompt could carry."""
    import dataclasses
    from saam.heads import HeadId
    p, rel, recs, images = run
    rel = dataclasses.replace(rel, heads=[HeadId(h.layer + HOSTILE, h.head) for h in rel.heads])
    recs = [dataclasses.replace(r, word=r.word + HOSTILE, caption=r.caption + HOSTILE) for r in recs]
    return p, rel, recs, images


def test_the_static_page_carries_names_as_data_only(run, tmp_path):
    from saam import tables
    from saam.explorer import write_page
    p, rel, recs, images = _hostile(run)
    mask = tables.eligible(p, run[1].heads)
    text = write_page(tmp_path / "e.html", recs, rel, images, p, n_images=1, mask=mask).read_text()
    assert text.count("</script>") == 1 and text.count("<img src=x") == 0 and "__DATA__" not in text.split("const DATA")[0]


@pytest.mark.parametrize("case,match", [("none", "no word records"), ("mask", "eligibility mask of"),
                                        ("heads", "maps of .* heads, the relevance"), ("images", "image\\(s\\) were given")])
def test_the_explorer_refuses_what_it_cannot_draw(run, tmp_path, case, match):
    import dataclasses
    from saam import tables
    from saam.explorer import write_page
    p, rel, recs, images = run
    mask = tables.eligible(p, rel.heads)
    recs = [r for r in recs if r.gt is not None]
    args = dict(none=([], rel, images, mask), mask=(recs, rel, images, mask[:-1]),
                heads=([dataclasses.replace(recs[0], maps=recs[0].maps[:-1])], rel, images, mask),
                images=(recs, rel, images[:0], mask))[case]
    with pytest.raises(ValueError, match=match):
        write_page(tmp_path / "e.html", args[0], args[1], args[2], p, mask=args[3])
    assert not (tmp_path / "e.html").exists()


@pytest.mark.slow
def test_hostile_names_stay_text_in_chromium(run, tmp_path):
    from saam import tables
    from saam.explorer import write_page
    p, rel, recs, images = _hostile(run)
    page = write_page(tmp_path / "e.html", recs, rel, images, p, n_images=1, mask=tables.eligible(p, run[1].heads))
    from conftest import chromium
    drv = chromium()
    try:
        drv.get(page.as_uri())
        b = drv.find_elements("css selector", "#img0 .words button")[0]
        b.click()
        fig = drv.find_elements("css selector", "#img0 .grid figure img")[0]
        drv.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))", fig)
        assert drv.execute_script("return window.pwned === undefined")
        assert HOSTILE in b.text and HOSTILE in fig.get_attribute("title")
        assert HOSTILE in drv.find_element("css selector", "#img0 p").text
        assert drv.execute_script("return Array.from(document.images).filter(i => i.getAttribute('src') === 'x').length") == 0
        assert not [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        drv.quit()


def test_ties_are_broken_as_the_selection_breaks_them(run):
    """issue 38: with tied relevance the explorer marks as bottom-k the heads bottom-k averages."""
    import dataclasses
    from saam import tables
    from saam.explorer import heads_of
    from saam.select import head_set
    p, rel, recs, images = run
    mask = tables.eligible(p, rel.heads)
    r = next(r for r in recs if r.gt is not None)
    m = rel.matrix.copy()
    m[rel.index(r.kind)] = np.round(m[rel.index(r.kind)])  # many ties, at 0 above all
    tied = dataclasses.replace(rel, matrix=m)
    t = heads_of(r, tied, r.kind, mask, p["tau"])
    for k in (3, 7):
        bottom = head_set("bottom", tied.heads, tied.row(r.kind), k, mask=mask).index
        top = head_set("top", tied.heads, tied.row(r.kind), k, mask=mask).index
        assert set(t[t.bottom_rank <= k]["index"]) == set(bottom) and set(t[t["rank"] <= k]["index"]) == set(top)
