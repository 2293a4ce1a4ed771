"""The search page (dpq/serve/static) driven in headless Chromium (Debian's, via Playwright):
upload a query image, results appear, switch to 8 bits and back, click a result."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the page test needs the playwright package (the dev extra)"
)

from dpq.serve import ServeSettings, create_app, running  # noqa: E402
from test_serve import _png, built  # noqa: E402, F401  (the module fixture: model + index)

CHROMIUM = Path(os.environ.get("DPQ_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps calling home, which on a closed
# network means a flood of failing connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"no Chromium at {CHROMIUM}: install Debian's (`apt-get install chromium`; "
    ".ci/run does) or point DPQ_CHROMIUM at a Chromium binary",
)


@pytest.fixture
def browser():
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _ranked_ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .result", "cards => cards.map(c => c.dataset.id)")


def test_page_upload_bits_and_click(built, tmp_path, browser):  # noqa: F811
    index = tmp_path / "db.index.npz"
    shutil.copy(built["index"], index)
    app = create_app(ServeSettings(index, built["model"], "digits"))
    query = tmp_path / "query.png"
    query.write_bytes(_png((24, 24), seed=11))
    with running(app) as url:
        for width, height, name in [(1280, 860, "laptop"), (390, 844, "phone")]:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
            page.goto(url + "/")
            page.wait_for_selector("#bits button[data-bits='32'][aria-checked='true']")
            assert "1,797" in page.inner_text("#facts")

            page.set_input_files("#file-input", str(query))
            page.wait_for_selector("#results .result:not(.skeleton)")
            page.wait_for_function("document.querySelectorAll('#results .result').length === 24")
            at_32 = _ranked_ids(page)
            assert "32-bit codes" in page.inner_text("#status")

            page.click("#bits button[data-bits='8']")
            page.wait_for_function(
                "document.querySelector('#status').textContent.startsWith('8-bit')"
            )
            at_8 = _ranked_ids(page)
            assert len(at_8) == 24
            page.click("#bits button[data-bits='32']")
            page.wait_for_function(
                "document.querySelector('#status').textContent.startsWith('32-bit')"
            )
            assert _ranked_ids(page) == at_32  # the same query again: the same ranking

            target = at_32[3]
            page.click(f"#results .result[data-id='{target}']")
            page.wait_for_function(
                f"document.querySelector('#results-title').textContent.includes('item {target}')"
            )
            page.wait_for_selector("#results .result img.thumb")
            assert page.is_visible("#precision")  # a collection item has a label
            assert "precision" in page.inner_text("#precision")
            # an item query leaves the item itself out by default (issue 24: it was its own
            # nearest, #1 of every item query)
            assert target not in _ranked_ids(page) and len(_ranked_ids(page)) == 24
            page.wait_for_function(
                "[...document.images].filter(i => i.closest('#results')).every(i => i.complete)"
            )
            page.screenshot(path=str(tmp_path / f"page-{name}.png"), full_page=False)
            assert (tmp_path / f"page-{name}.png").stat().st_size > 10_000
            assert errors == []
            page.close()
