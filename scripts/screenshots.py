"""Make the README's pictures: the demo page (docs/demo.png) with a real model and index, and a
quickstart report (docs/report.png). Needs the serve extra, playwright and Chromium.

    python scripts/screenshots.py --model RUN/model --index EMB_DIR --image TEST.png --query "red heart" \
        --labels "heart, face, flag, animal, food" --report runs/quickstart-STAMP/report.html
"""

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

import clipper
from clipper.serve.service import Service
from clipper.serve.testing import serve_in_thread

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--query", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--report")
    args = ap.parse_args()
    service = Service(clipper.load(args.model), Path(args.model).parent.name, args.index)
    url, stop = serve_in_thread(service)
    url += "/"
    DOCS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(url)
        page.wait_for_function("document.getElementById('status').textContent.includes('model')")
        page.fill("#labels", args.labels)
        page.set_input_files("#file", args.image)
        page.wait_for_selector("#neighbours .hit img")
        page.wait_for_function("document.getElementById('caption').textContent.length > 0")
        page.fill("#query", args.query)
        page.click("button[type=submit]")
        page.wait_for_selector("#results .hit img")
        page.wait_for_function("[...document.querySelectorAll('img')].every(i => i.complete)")
        page.screenshot(path=str(DOCS / "demo.png"), full_page=True)
        if args.report:
            page.set_viewport_size({"width": 1000, "height": 900})
            page.goto(Path(args.report).resolve().as_uri())
            page.screenshot(path=str(DOCS / "report.png"), full_page=False)
        browser.close()
    stop()
    print("wrote", DOCS / "demo.png", *([DOCS / "report.png"] if args.report else []))


if __name__ == "__main__":
    main()
