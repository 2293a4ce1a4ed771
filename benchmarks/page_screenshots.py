"""Screenshots of the search page (`dpq serve`) in headless Chromium, for README and review.

Builds a small real collection with the commands README's "Serve a collection" shows, on
scikit-learn's digits (nothing is downloaded): `dpq demo --out` trains a small CNN on 500
digits (about a minute on two cores; 0.97 mAP) and keeps the model and its split, `dpq encode`
the database rows of that split (1,197 digits), `dpq serve` the index with its model and images on
127.0.0.1 (a free port), then drives the page and writes into OUT:

  desktop.png   an item query at 16 bits after 8 (badges show how results moved), 1280x860
  phone.png     the same query on a 390x844 phone: results on the first screen
  upload.png    an uploaded digit of the split's query rows (not in the database), labelled
                with the model's prediction ("predicted: 3, 0.93")
  filter.png    a query labelled 3 searching only among 3s and 8s (--filter; the filter open),
                1280x960 so that the label chips show
  ties.png      an item query at 8 bits: results at one distance boxed as a tie group

Each PNG is reduced to a 256-colour palette with Pillow (thumbnails are 8x8 digits, so
this loses nothing visible). The run folder (--run, default a temporary one) keeps the
model and index: a second run with the same --run skips training and encoding.

    python benchmarks/page_screenshots.py                     # into docs/screenshots/
    python benchmarks/page_screenshots.py --out /tmp/shots --run /tmp/shots-run --item 40

Needs the `serve` extra, playwright and a Chromium (DPQ_CHROMIUM, default /usr/bin/chromium).
Loopback only; never run by CI.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = Path(os.environ.get("DPQ_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
FILTER_VIEW = {"width": 1280, "height": 960}
WAIT_MS = 30_000


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"),
                        help="folder for the PNGs (created; default docs/screenshots)")  # fmt: skip
    parser.add_argument("--run", type=Path, help="keep the model and index here (reused)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    parser.add_argument("--item", type=int, help="the item to query (default: the first "
                        "database row the model labels right with a tie group at 8 bits)")  # fmt: skip
    parser.add_argument("--filter", default="3,8", help="labels of the filtered search")
    return parser.parse_args()


def _dpq(*args: str) -> None:
    command = [sys.executable, "-m", "dpq", *args]
    print("$ dpq " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def build(run: Path, epochs: int) -> dict[str, Path]:
    """Train (`dpq demo`: small_cnn on 500 digits, the split beside the model), encode the
    split's database rows; each skipped where run already holds its output. The paths."""
    model, index = run / "model-run" / "model", run / "db.index.npz"
    split = run / "model-run" / "split.json"
    if not (model / "config.json").is_file():
        _dpq("demo", "--epochs", str(epochs), "--out", str(run / "model-run"), "--quiet")
    if not index.is_file():
        _dpq("encode", "--model", str(model), "--images", "digits", "--split", str(split),
             "--out", str(index), "--quiet")  # fmt: skip
    return {"model": model, "index": index, "split": split}


class Service:
    """`dpq serve` in a subprocess on 127.0.0.1 and a free port; its URL from the startup
    line. A context manager: the process is stopped on exit."""

    def __init__(self, paths: dict[str, Path], log: Path) -> None:
        self.log = log
        args = ["serve", "--index", str(paths["index"]), "--model", str(paths["model"]),
                "--images", "digits", "--port", "0"]  # fmt: skip
        print("$ dpq " + " ".join(args), flush=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dpq", *args],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        deadline = time.monotonic() + 120
        while True:  # the startup line names the URL
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/", log.read_text())
            if found:
                self.url = found.group(1)
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"dpq serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        print(log.read_text().strip(), flush=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)


def pick_item(url: str, split: Path) -> int:
    """A database item whose 8-bit answer has a tie group of 3 or more on the first page,
    and whose 32-bit neighbours mostly share its label (a fair picture of the model)."""
    database = json.loads(split.read_text())["database"]
    for item in database[::7][:60]:
        at_8 = _post(url + "/search", {"id": item, "k": 24, "bits": 8})
        own = at_8["query"]["label"]
        at_32 = _post(url + "/search", {"id": item, "k": 24, "bits": 32})
        agree = sum(r["label"] == own for r in at_32["results"])
        if agree >= 20 and any(g["end"] - g["start"] >= 3 for g in at_8["tie_groups"]):
            return int(item)
    return int(database[0])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from dpq.data import load_digits

    digits = load_digits()
    return np.asarray(digits.images), np.asarray(digits.labels)


def query_png(split: Path, path: Path) -> Path:
    """The first query row of the split as a PNG (a digit the index does not hold)."""
    row = json.loads(split.read_text())["query"][0]
    Image.fromarray(_digits()[0][row]).save(path)
    return path


def item_labelled(split: Path, label: str) -> int:
    """The first database row of the split with this label (digits: "0".."9")."""
    labels = _digits()[1]
    return next(int(row) for row in json.loads(split.read_text())["database"]
                if str(labels[row]) == label)  # fmt: skip


def _settle(page) -> None:
    page.wait_for_function(
        "document.querySelector('#results').getAttribute('aria-busy') === 'false' && "
        "document.querySelectorAll('#results .result:not(.skeleton)').length > 0"
    )
    page.wait_for_function("[...document.images].filter(i => !i.hidden).every(i => i.complete)")


def shoot(page, path: Path) -> None:
    """A screenshot of the top of the page, as a 256-colour PNG (animations finished)."""
    page.evaluate("window.scrollTo(0, 0)")
    picture = Image.open(io.BytesIO(page.screenshot(full_page=False, animations="disabled")))
    small = picture.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.0f} KB", flush=True)


def screenshots(
    url: str, out: Path, item: int, upload: Path, labels: list[str], filtered_item: int
) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=DESKTOP)
        page.set_default_timeout(WAIT_MS)
        page.goto(f"{url}/#id={item}&bits=8")
        _settle(page)
        page.click("#bits [data-bits='16']")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('16')")
        _settle(page)
        shoot(page, out / "desktop.png")

        phone = browser.new_page(viewport=PHONE)
        phone.set_default_timeout(WAIT_MS)
        phone.goto(f"{url}/#id={item}&bits=32")
        _settle(phone)
        shoot(phone, out / "phone.png")
        phone.close()

        page.set_input_files("#file-input", str(upload))
        page.wait_for_function("document.querySelector('#query-caption').textContent"
                               ".includes('predicted')")  # fmt: skip
        _settle(page)
        shoot(page, out / "upload.png")

        page.set_viewport_size(FILTER_VIEW)
        page.goto(f"{url}/#id={filtered_item}&bits=32")
        page.reload()
        _settle(page)
        page.click("#filter summary")
        for label in labels:
            page.check(f"#filter input[value='{label}']")
            _settle(page)
        page.wait_for_function(
            "t => document.querySelector('#results-title').textContent.includes(t)",
            arg=", ".join(labels),
        )
        _settle(page)
        shoot(page, out / "filter.png")

        page.set_viewport_size(DESKTOP)
        page.goto(f"{url}/#id={item}&bits=8")
        page.reload()
        _settle(page)
        shoot(page, out / "ties.png")
        browser.close()


def main() -> int:
    args = _parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dpq-shots-") as scratch:
        run = args.run or Path(scratch)
        run.mkdir(parents=True, exist_ok=True)
        paths = build(run, args.epochs)
        with Service(paths, run / "serve.log") as service:
            item = args.item if args.item is not None else pick_item(service.url, paths["split"])
            print(f"query item {item}", flush=True)
            upload = query_png(paths["split"], run / "query-digit.png")
            labels = args.filter.split(",")
            filtered = item_labelled(paths["split"], labels[0])
            screenshots(service.url, args.out, item, upload, labels, filtered)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
