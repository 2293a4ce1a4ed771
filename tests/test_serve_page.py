"""The search page (dpq/serve/static) driven in headless Chromium (Debian's, via Playwright):
upload a query image, results appear, switch to 8 bits and back, click a result; a page of
another origin tries to write; the API docs render with no network."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip(
    "playwright.sync_api", reason="the page test needs the playwright package (the dev extra)"
)

from conftest import needs_chromium, wait_until  # noqa: E402
from dpq.serve import ServeSettings, create_app, running  # noqa: E402
from test_serve import _png, built  # noqa: E402, F401  (the module fixture: model + index)

pytestmark = needs_chromium


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


ATTACK_PAGE = """<!doctype html><meta charset="utf-8"><title>a page on another port</title>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe><iframe name="sink3"></iframe>
<form id="urlencoded" method="POST" action="TARGET/items" target="sink1">
  <input name="vectors" value="VECTOR"></form>
<form id="multipart" method="POST" action="TARGET/items" target="sink2"
      enctype="multipart/form-data"><input type="file" name="files"></form>
<form id="plain" method="POST" action="TARGET/items" target="sink3" enctype="text/plain">
  <input name='{"vectors": [VECTOR], "pad": "' value='"}'></form>
<script>
async function tryFetches() {
  const json = JSON.stringify({vectors: [VECTOR]});
  const sent = [];
  const attempt = (options) => fetch("TARGET/items", {method: "POST", ...options})
    .then((r) => sent.push(r.type), () => sent.push("refused by the browser"));
  await attempt({mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: json});
  await attempt({mode: "no-cors", body: new URLSearchParams({vectors: json})});
  await attempt({headers: {"Content-Type": "application/json"}, body: json});
  const form = new FormData();
  form.append("files", new Blob(["not really a png"], {type: "image/png"}), "x.png");
  await attempt({mode: "no-cors", body: form});
  return sent;
}
</script>"""


def _post_items_answers(client) -> dict[str, float]:
    """Count of POST /items answers by status, from the service's own metrics."""
    counts: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('dpq_responses_total{endpoint="/items",method="POST"'):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
    return counts


def test_a_page_on_another_port_cannot_write(built, tmp_path, browser):  # noqa: F811
    """A real page served from another loopback port (another origin, the same site) tries
    fetch (JSON, text/plain, form-encoded, multipart) and <form> posts (urlencoded,
    multipart, text/plain) against a service whose writes are open: no item is added, and
    the requests that reached the service were refused with 403."""
    import functools
    import http.server
    import threading

    import httpx

    index = tmp_path / "vectors.index.npz"
    shutil.copy(built["vectors"], index)
    app = create_app(ServeSettings(index, allow_open_writes=True))
    upload = tmp_path / "x.png"
    upload.write_bytes(_png())
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        site = tmp_path / "site"
        site.mkdir()
        vector = "[" + ", ".join(["0.5"] * 16) + "]"
        page_text = ATTACK_PAGE.replace("TARGET", url).replace("VECTOR", vector)
        (site / "index.html").write_text(page_text)
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
        handler.log_message = lambda *args: None
        other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(f"http://127.0.0.1:{other.server_address[1]}/index.html")
            sent = page.evaluate("tryFetches()")
            assert "refused by the browser" in sent  # the JSON fetch: its preflight failed
            page.set_input_files("#multipart input[type=file]", str(upload))
            for form in ("urlencoded", "multipart", "plain"):
                page.evaluate(f"document.getElementById('{form}').submit()")
            wait_until(  # 3 fetches + 3 forms
                lambda: _post_items_answers(client).get("403", 0) >= 6,
                20,
                lambda: f"6 refused POST /items (answers: {_post_items_answers(client)})",
                interval=0.05,
            )
            page.close()
        finally:
            other.shutdown()
        answers = _post_items_answers(client)
        assert set(answers) == {"403"}, answers  # every one that arrived was refused
        assert client.get("/health").json()["items"] == 500  # and nothing was added


def test_api_docs_render_without_a_network(built, tmp_path, browser):  # noqa: F811
    """/docs loads Swagger UI from the service itself (fastapi-offline), not from a CDN: on
    this machine, which reaches no network, the page renders the API's operations."""
    index = tmp_path / "vectors.index.npz"
    shutil.copy(built["vectors"], index)
    with running(create_app(ServeSettings(index))) as url:
        page = browser.new_page()
        page.set_default_timeout(20_000)
        outside: list[str] = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
        page.goto(url + "/docs")
        page.wait_for_selector(".swagger-ui .info .title")
        assert "dpq search service" in page.inner_text(".swagger-ui .info .title")
        page.wait_for_selector("#operations-default-search_search_post")
        assert outside == []  # every asset came from the service
        page.close()
