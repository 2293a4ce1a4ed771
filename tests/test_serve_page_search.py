"""The search page's behaviour in headless Chromium (issue 24, findings 5, 7 and 9): an
upload's label is the model's prediction, `hidden` is honoured, a failed search clears the
page and its error stays, results show above the fold on a phone, item queries leave the
item out unless asked, distances print readably, keyboard and screen-reader use, tie groups,
the label filter and code-usage warnings.

One service (sklearn's digits, a small_cnn model, thumbnails) and one browser serve the
module; each test opens its own page. The expected answers come from the same service's API
(httpx), so the page is checked against what the service says.
"""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("playwright.sync_api")

from conftest import needs_chromium  # noqa: E402
from dpq.index import DPQIndex  # noqa: E402
from dpq.serve import ServeSettings, create_app, running  # noqa: E402
from test_serve import _png, built  # noqa: E402, F401  (the module fixture: model + index)
from test_serve_page import _ranked_ids  # noqa: E402

DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
pytestmark = needs_chromium
WAIT_MS = 20_000  # every wait of the page: bounded, and says what it waited for


@pytest.fixture(scope="module")
def service(built, tmp_path_factory):  # noqa: F811
    """The digits service (model + thumbnails) at a URL, with an httpx client on it."""
    folder = tmp_path_factory.mktemp("page")
    index = folder / "db.index.npz"
    shutil.copy(built["index"], index)
    with running(create_app(ServeSettings(index, built["model"], "digits"))) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield url, client


@pytest.fixture(scope="module")
def query_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("query") / "query.png"
    path.write_bytes(_png((24, 24), seed=11))
    return path


def _open(browser, url: str, hash_: str = "", viewport=DESKTOP):  # noqa: F811
    """A page of the service, its JavaScript errors collected in page.errors."""
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(WAIT_MS)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(url + "/" + hash_)
    page.wait_for_selector("#bits [aria-checked='true']")  # /stats has loaded
    return page


def _wait_results(page, count: int = 24) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#results .result:not(.skeleton)').length === n "
        "&& document.querySelector('#results').getAttribute('aria-busy') === 'false'",
        arg=count,
    )


def _wait_ranking(page, ids: list[str]) -> None:
    page.wait_for_function(
        "ids => JSON.stringify([...document.querySelectorAll('#results .result')]"
        ".map(c => c.dataset.id)) === JSON.stringify(ids)",
        arg=ids,
    )


def _search(client, **body) -> dict:
    answer = client.post("/search", json={"k": 24, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()


# ---------------------------------------------------------------- the upload's label (7)


def test_an_upload_is_labelled_with_the_prediction_not_the_last_item(service, browser, query_png):
    url, client = service
    with query_png.open("rb") as file:
        answer = client.post("/search", files={"file": ("query.png", file, "image/png")})
    predicted = answer.json()["query"]["predicted_label"]
    probability = answer.json()["query"]["predicted_probability"]
    page = _open(browser, url)
    for _ in range(30):  # a random item whose label is not the prediction (bounded draws)
        page.click("#random-button")
        page.wait_for_function("document.querySelector('#results-title').textContent"
                               ".includes('item ')")  # fmt: skip
        _wait_results(page)
        item_label = page.eval_on_selector("#label-select", "s => s.selectedOptions[0].text")
        if predicted not in item_label:
            break
    else:
        pytest.fail(f"30 random items were all labelled {predicted!r}")

    page.set_input_files("#file-input", str(query_png))
    page.wait_for_function("document.querySelector('#results-title').textContent"
                           ".includes('your image')")  # fmt: skip
    _wait_results(page)
    shown = f"predicted: {predicted}, {probability:.2f}"
    page.wait_for_function(
        "text => document.querySelector('.query-panel').innerText.includes(text)", arg=shown
    )
    note = page.inner_text("#precision-note")
    assert f"“{predicted}”" in note  # precision is judged against the prediction
    labels = page.eval_on_selector_all(
        "#results .result .label", "ls => ls.map(l => l.textContent)"
    )
    hits = sum(label == predicted for label in labels)
    assert f"{hits}/24" in note

    other = next(c for c in map(str, range(10)) if c != predicted)
    page.select_option("#label-select", other)  # the user says what the image is
    page.wait_for_function(
        "c => document.querySelector('#precision-note').textContent.includes('“' + c + '”')",
        arg=other,
    )
    assert f"{sum(label == other for label in labels)}/24" in page.inner_text("#precision-note")
    assert page.errors == []
    page.close()


# ---------------------------------------------------------------- hidden means hidden (7)


def test_nothing_hidden_shows_before_a_search(service, browser):
    url, _ = service
    for viewport in (DESKTOP, PHONE):
        page = _open(browser, url, viewport=viewport)
        for selector in ("#precision", "#query-image", "#query-caption", "#more-button"):
            assert page.get_attribute(selector, "hidden") is not None, selector
            assert not page.is_visible(selector), f"{selector} shows before any search"
        assert page.is_visible("#drop-hint")
        page.close()


# ---------------------------------------------------------------- a failed search (7)


def test_a_failed_search_clears_the_page_and_its_error_stays(service, browser, tmp_path):
    url, _ = service
    page = browser.new_page(viewport=DESKTOP)
    page.set_default_timeout(WAIT_MS)
    page.clock.install()  # the page's timers run only when the test moves this clock
    page.goto(url + "/#id=5")
    _wait_results(page)
    assert page.is_visible("#more-button") and page.is_visible("#precision")

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    page.set_input_files("#file-input", str(broken))
    page.wait_for_selector("#error", state="visible")
    assert "415" in page.inner_text("#error")
    assert page.query_selector_all("#results .result") == []
    assert "nearest" not in page.inner_text("#results-title")
    assert "item 5" not in page.inner_text("#results-title")
    assert not page.is_visible("#more-button")
    assert not page.is_visible("#precision")

    page.clock.run_for(60_000)  # a minute later the error is still there
    assert page.is_visible("#error")
    page.click("#random-button")  # the next action clears it
    _wait_results(page)
    assert not page.is_visible("#error")
    page.close()


# ---------------------------------------------------------------- a phone (7)


def test_results_show_above_the_fold_on_a_phone(service, browser):
    url, _ = service
    page = _open(browser, url, "#id=5", viewport=PHONE)
    _wait_results(page)
    page.evaluate("window.scrollTo(0, 0)")
    visible = page.eval_on_selector_all(
        "#results .result",
        "cards => cards.filter(c => c.getBoundingClientRect().bottom <= innerHeight).length",
    )
    assert visible >= 6, f"only {visible} results fit the first screen of a 390x844 phone"
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways
    page.close()


# ---------------------------------------------------------------- the query item (7)


def test_an_item_query_leaves_the_item_out_unless_asked(service, browser):
    url, client = service
    page = _open(browser, url, "#id=5")
    _wait_results(page)
    assert "5" not in _ranked_ids(page)
    assert page.is_visible("#include-query") and not page.is_checked("#include-query")
    with_it = [str(r["id"]) for r in _search(client, id=5, exclude_query=False)["results"]]
    assert "5" in with_it
    page.check("#include-query")
    _wait_ranking(page, with_it)
    page.close()


# ---------------------------------------------------------------- distances (7)


@pytest.mark.parametrize(
    ("distance", "shown"),
    [
        (-7.63e-5, "dist 0"),  # a rounding error below zero is zero
        (3.2e-9, "dist 0"),
        (0.123456, "dist 0.123"),
        (3.14159, "dist 3.14"),
        (100.7, "dist 101"),
        (12345.6, "dist 12,300"),
    ],
)
def test_distances_print_with_three_significant_digits(service, browser, distance, shown):
    url, _ = service
    page = _open(browser, url)
    assert page.evaluate("d => formatScore(d)", distance) == shown
    page.close()


def test_result_cards_never_print_exponents_or_negative_distances(service, browser):
    url, _ = service
    page = _open(browser, url, "#id=5")
    page.check("#include-query")  # its own distance is a rounding error around zero
    page.wait_for_selector("#results .result[data-id='5']")
    assert page.inner_text("#results .result[data-id='5'] .dist") == "dist 0"
    texts = page.eval_on_selector_all("#results .result .dist", "ds => ds.map(d => d.textContent)")
    assert not [t for t in texts if "e" in t.split()[-1] or "-" in t], texts
    page.close()


# ---------------------------------------------------------------- keyboard and screen readers (7)


def test_the_bit_selector_is_a_radio_group_for_the_keyboard(service, browser):
    url, _ = service
    page = _open(browser, url, "#id=5")
    _wait_results(page)
    radios = "#bits [role='radio']"
    assert page.eval_on_selector_all(radios, "rs => rs.map(r => r.tabIndex)") == [-1, -1, -1, 0]
    page.focus(f"{radios}[aria-checked='true']")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('24-bit')")
    assert page.evaluate("document.activeElement.dataset.bits") == "24"
    assert page.get_attribute(f"{radios}[data-bits='24']", "aria-checked") == "true"
    page.keyboard.press("Home")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('8-bit')")
    page.keyboard.press("ArrowLeft")  # wraps around to the last
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('32-bit')")
    assert page.eval_on_selector_all(radios, "rs => rs.map(r => r.tabIndex)") == [-1, -1, -1, 0]
    page.close()


def _focus_ring(page) -> dict:
    return page.evaluate(
        "() => { const s = getComputedStyle(document.activeElement);"
        " return {style: s.outlineStyle, width: parseFloat(s.outlineWidth),"
        " visible: document.activeElement.matches(':focus-visible')}; }"
    )


def test_keyboard_focus_is_visible_and_space_opens_a_card(service, browser):
    url, _ = service
    page = _open(browser, url, "#id=5")
    _wait_results(page)
    page.focus("#k-select")
    for _ in range(40):  # Tab to the first result (bounded)
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('result')"):
            break
    else:
        pytest.fail("Tab never reached a result card")
    ring = _focus_ring(page)
    assert ring["visible"] and ring["style"] != "none" and ring["width"] >= 2, ring
    page.keyboard.press("Tab")
    target = page.evaluate("document.activeElement.dataset.id")
    page.keyboard.press("Space")
    page.wait_for_function(
        "id => document.querySelector('#results-title').textContent.includes('item ' + id)",
        arg=target,
    )
    page.focus("#bits [aria-checked='true']")
    page.keyboard.press("ArrowRight")
    ring = _focus_ring(page)
    assert ring["style"] != "none" and ring["width"] >= 2, ring
    page.close()


def test_a_live_status_line_counts_results_and_tie_groups(service, browser):
    url, client = service
    page = _open(browser, url, "#id=5&bits=8")
    _wait_results(page)
    assert page.get_attribute("#results", "aria-live") is None  # cards are not re-announced
    answer = _search(client, id=5, bits=8)
    groups = len(answer["tie_groups"])
    assert groups >= 1  # 1,797 digits share 256 8-bit codes
    expected = f"24 results, {groups} tie group{'s' if groups != 1 else ''}"
    live = page.locator("[aria-live='polite']", has_text="results")
    page.wait_for_function(
        "t => [...document.querySelectorAll('[aria-live=polite]')]"
        ".some(e => e.textContent.trim() === t)",
        arg=expected,
    )
    assert live.count() == 1
    page.close()


def test_the_query_image_has_alt_text(service, browser, query_png):
    url, _ = service
    page = _open(browser, url, "#id=5")
    _wait_results(page)
    assert "item 5" in page.get_attribute("#query-image", "alt")
    page.set_input_files("#file-input", str(query_png))
    page.wait_for_function("document.querySelector('#query-image').alt.includes('query.png')")
    page.close()


# ---------------------------------------------------------------- tie groups (5)


def test_tie_groups_are_shown_as_groups(service, browser):
    url, client = service
    page = _open(browser, url, "#id=5&bits=8")
    _wait_results(page)
    answer = _search(client, id=5, bits=8)
    assert _ranked_ids(page) == [str(r["id"]) for r in answer["results"]]
    boxes = page.query_selector_all("#results .tie-group")
    assert len(boxes) == len(answer["tie_groups"])
    for box, group in zip(boxes, answer["tie_groups"], strict=True):
        members = [r["id"] for r in answer["results"] if group["start"] <= r["rank"] < group["end"]]
        inside = box.eval_on_selector_all(".result", "cs => cs.map(c => Number(c.dataset.id))")
        assert inside == members
        note = box.inner_text()
        distance = page.evaluate("d => formatScore(d).split(' ').pop()", group["distance"])
        assert f"tied at distance {distance}" in note.lower()
        assert f"{group['end'] - group['start']} items" in note
        assert f"ranks {group['start'] + 1}–{group['end']}" in note  # 1-based, as the cards
        assert "order among them is arbitrary" in note
    page.close()


# ---------------------------------------------------------------- the label filter (9)


def test_a_label_filter_is_sent_and_applied(service, browser):
    url, client = service
    page = _open(browser, url, "#id=5")
    _wait_results(page)
    sent: list[dict] = []
    page.on(
        "request",
        lambda r: sent.append(r.post_data_json) if r.url.endswith("/search") else None,
    )
    page.click("#filter summary")
    page.check("#filter input[value='3']")
    page.wait_for_function("document.querySelector('#results-title').textContent.includes('3')")
    _wait_results(page)
    page.check("#filter input[value='8']")
    page.wait_for_function("document.querySelector('#results-title').textContent.includes('3, 8')")
    _wait_results(page)
    assert sent[-1]["filter"] == {"labels": ["3", "8"], "match": "any"}
    labels = page.eval_on_selector_all(
        "#results .result .label", "ls => ls.map(l => l.textContent)"
    )
    assert set(labels) == {"3", "8"}
    expected = _search(client, id=5, filter={"labels": ["3", "8"]})
    assert _ranked_ids(page) == [str(r["id"]) for r in expected["results"]]
    assert f"{expected['matching']:,}" in page.inner_text("#status")
    assert not page.is_visible("#filter-match")  # one label per item: no any/all choice
    page.close()


# ---------------------------------------------------------------- code usage warnings (6)


def test_code_usage_warnings_are_shown(service, built, browser, tmp_path):  # noqa: F811
    url, client = service
    page = _open(browser, url)
    if not client.get("/stats").json()["warnings"]:
        assert not page.is_visible("#notice")
    page.close()
    codebooks = DPQIndex.load(built["index"]).codebooks
    collapsed = DPQIndex(codebooks, metadata={"classes": ["a", "b"]})
    collapsed.add(np.zeros((300, codebooks.shape[0]), np.uint8), labels=np.arange(300) % 2)
    collapsed.save(tmp_path / "collapsed.index.npz")
    with running(create_app(ServeSettings(tmp_path / "collapsed.index.npz"))) as other:
        warnings = httpx.get(other + "/stats").json()["warnings"]
        assert warnings
        page = _open(browser, other)
        page.wait_for_selector("#notice", state="visible")
        text = page.inner_text("#notice")
        for warning in warnings:
            assert warning[:60] in text
        page.close()


def test_a_multi_label_filter_offers_any_and_all(service, built, browser, tmp_path):  # noqa: F811
    """Multi-hot labels: the filter offers any/all, and "all" is sent and applied."""
    codebooks = DPQIndex.load(built["index"]).codebooks
    rng = np.random.default_rng(3)
    labels = (rng.random((400, 3)) < 0.5).astype(np.uint8)
    index = DPQIndex(codebooks, metadata={"classes": ["sky", "sea", "dog"]})
    index.add(rng.integers(0, 256, (400, codebooks.shape[0])).astype(np.uint8), labels=labels)
    index.save(tmp_path / "multi.index.npz")
    with running(create_app(ServeSettings(tmp_path / "multi.index.npz"))) as other:
        page = _open(browser, other, "#id=0")
        _wait_results(page)
        sent: list[dict] = []
        page.on("request", lambda r: sent.append(r.post_data_json) if "/search" in r.url else None)
        page.click("#filter summary")
        assert page.is_visible("#filter-match")
        page.check("#filter input[value='sky']")
        page.check("#filter input[value='sea']")
        page.check("#filter-match input[value='all']")
        page.wait_for_function(
            "document.querySelector('#results-title').textContent.includes('with all of sky, sea')"
        )
        _wait_results(page)
        assert sent[-1]["filter"] == {"labels": ["sky", "sea"], "match": "all"}
        shown = page.eval_on_selector_all(
            "#results .result .label", "ls => ls.map(l => l.textContent)"
        )
        assert all("sky" in text and "sea" in text for text in shown), shown
        page.close()
