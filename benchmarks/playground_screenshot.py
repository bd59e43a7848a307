"""The README's playground screenshot (docs/playground.png), from the real thing: `arbiter serve` on the embedded
model with the committed heads, the page driven by Debian's chromium through Playwright, one rerank request.

    python benchmarks/playground_screenshot.py [--prompt "..."] [--n 8] [--seed 7]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

import _serve  # benchmarks/ is on sys.path: the script's own directory

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "playground.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="How can I keep my houseplants alive while I travel for two weeks?")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--heads", nargs="*", default=["helpful", "helpful_prefix"])
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt install chromium)")
    log = ROOT / "runs" / "playground_screenshot_server.log"
    proc, url = _serve.start_server({"ARBITER_HEADS_DIR": str(ROOT / "heads"), "ARBITER_THREADS": "2"}, log)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url + "/playground")
            page.wait_for_selector(f"#ch-{args.heads[0]}")
            for h in args.heads[1:]:
                page.check(f"#ch-{h}")
            page.fill("[data-testid=n]", str(args.n))
            page.fill("[data-testid=seed]", str(args.seed))
            page.fill("[data-testid=max_tokens]", str(args.max_tokens))
            page.fill("[data-testid=prompt]", args.prompt)
            page.click("[data-testid=send]")
            page.locator("[data-testid=candidate]").nth(args.n - 1).wait_for(timeout=300_000)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OUT), full_page=True)
            browser.close()
    finally:
        _serve.stop_server(proc)
    print(OUT)


if __name__ == "__main__":
    main()
