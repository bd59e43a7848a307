"""The playground page in a real headless browser (Debian's chromium driven by Playwright), against the live app on
a fake engine whose rewards are known exactly: the page loads with no asset from outside the server, a rerank
request shows N candidate cards ordered by reward with each head's exact reward and the chosen one marked, the
winner streams into the conversation, vote groups and pruning are shown, /v1/score mode scores pasted answers,
the heads tab shows a head's card and its plot, and the API key typed into the page is what authorises it.
A screenshot is saved as a test artifact (``$ARBITER_TEST_ARTIFACTS``, default ``runs/test-artifacts``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from arbiter.testing import served as served_fake
from arbiter.testing.fakes import FakeEngine, Scripted, linear_head, registry_with

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("ARBITER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):  # CI installs it (.ci/run): there a missing browser is a failure
    raise RuntimeError("no chromium on PATH: .ci/run installs Debian's chromium for this test")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt install chromium)")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ARBITER_TEST_ARTIFACTS") or ROOT / "runs" / "test-artifacts")
# Features (a, b, 0, 0): head A reads a, head B reads b (linear heads): exact rewards.
SCRIPT = (Scripted("The answer is B.", (0.9, -0.5, 0, 0)), Scripted("The answer is A.", (0.2, 0.7, 0, 0)),
          Scripted("I think B.", (0.5, 0.1, 0, 0)), Scripted("B, surely.", (0.3, 0.3, 0, 0)))
REWARDS_A = [0.9, 0.2, 0.5, 0.3]
REWARDS_B = [-0.5, 0.7, 0.1, 0.3]


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith("blob:") else outside.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/playground")
    return page, outside, errors


def cards(page) -> list[dict]:
    out = []
    for c in page.locator("[data-testid=candidate]").all():
        out.append({"index": int(c.get_attribute("data-index")), "chosen": c.get_attribute("data-chosen") == "true",
                    "text": c.locator("[data-testid=candidate-text]").inner_text(),
                    "A": c.locator("[data-testid=reward-A]").inner_text(), "B": c.locator("[data-testid=reward-B]").inner_text()})
    return out


def test_a_rerank_request_shows_every_candidate_with_its_exact_rewards_and_the_pick(browser, tmp_path):
    heads = registry_with(linear_head("A", [1, 0, 0, 0]), linear_head("B", [0, 1, 0, 0]))
    with served_fake.served(FakeEngine(SCRIPT), heads) as srv:
        page, outside, errors = open_page(browser, srv.url)
        page.wait_for_selector("#ch-A")
        page.check("#ch-B")  # A (the default) picks, B is also scored
        page.fill("[data-testid=n]", "4")
        page.fill("[data-testid=prompt]", "Which is it?")
        page.click("[data-testid=send]")
        page.locator("[data-testid=candidate]").nth(3).wait_for()
        got = cards(page)
        order = sorted(range(4), key=lambda i: -REWARDS_A[i])
        assert [c["index"] for c in got] == order  # ordered by the picking head's reward
        assert [c["text"] for c in got] == [SCRIPT[i].text for i in order]
        assert [c["A"] for c in got] == [f"{REWARDS_A[i]:.4f}" for i in order]
        assert [c["B"] for c in got] == [f"{REWARDS_B[i]:.4f}" for i in order]
        assert [c["chosen"] for c in got] == [True, False, False, False]
        assert page.locator("[data-testid=chosen-badge]").count() == 1
        # The winner streamed into the conversation (the page asked for a stream; the server's own pick).
        assert page.locator("#conversation .msg.assistant").inner_text() == SCRIPT[0].text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        assert (ARTIFACTS / "playground.png").stat().st_size > 10_000

        # A vote rule: the groups with their weights; the majority answer "B" (3 of 4) wins.
        page.select_option("[data-testid=select]", "majority_vote")
        page.select_option("[data-testid=extractor]", "regex")
        page.fill("#extractor-arg", r"\b([AB])\b")
        page.fill("[data-testid=prompt]", "Again?")
        page.click("[data-testid=send]")
        page.wait_for_selector("[data-testid=groups]")
        rows = page.locator("[data-testid=groups] tr").all_inner_texts()
        assert rows[1].split("\t")[:2] == ["B", "3"] and rows[2].split("\t")[:2] == ["A", "1"]
        assert page.locator("[data-chosen=true]").get_attribute("data-index") == "0"  # B's best member

        # /v1/score mode: pasted answers scored by both heads, the best marked.
        page.click("nav button[data-tab=score]")
        page.check("#sh-A")
        page.fill("[data-testid=score-prompt]", "Which is it?")
        page.fill("[data-testid=score-answers]", "I think B.\n---\nThe answer is B.")
        page.click("[data-testid=score-send]")
        page.wait_for_selector("[data-testid=score-card]")
        sc = page.locator("[data-testid=score-card]").all()
        assert [s.get_attribute("data-index") for s in sc] == ["1", "0"]
        assert sc[0].locator("[data-testid=reward-A]").inner_text() == "0.9000"
        assert "chosen" in (sc[0].get_attribute("class") or "")
        assert not outside and not errors, (outside, errors)


def test_pruning_and_the_heads_tab_with_its_card_and_plot(browser, tmp_path):
    from arbiter.heads import HeadRegistry
    from arbiter.heads.card import write_card
    from arbiter.testing.fakes import FAKE_FINGERPRINT, save_random_head

    root = tmp_path / "project"
    save_random_head(FAKE_FINGERPRINT, root / "heads" / "H", name="H", seed=0)
    plots = root / "reports"
    plots.mkdir(parents=True)
    png = ROOT / "benchmarks" / "reports" / "early_rejection.png"
    shutil.copy(png, plots / "training_curves.png")
    (root / "secret.png").write_bytes(png.read_bytes())  # not linked by the card: never served
    write_card(root / "heads" / "H", plots_dir=plots)
    reg = HeadRegistry(root / "heads", FAKE_FINGERPRINT)
    assert reg.load_all()[0] == ["H"]
    with served_fake.served(FakeEngine(SCRIPT), reg, api_key="sesame") as srv:
        page, outside, errors = open_page(browser, srv.url)
        page.wait_for_selector("[data-testid=error]:not(.hidden)")  # no key typed: 401, said on the page
        assert "401" in page.locator("[data-testid=error]").inner_text()
        page.fill("[data-testid=apikey]", "sesame")
        page.dispatch_event("[data-testid=apikey]", "change")
        page.wait_for_selector("#ch-H")
        page.click("nav button[data-tab=heads]")
        page.click("button[data-card=H]")
        page.wait_for_selector("[data-testid=plot]")
        assert "# Head `H`" in page.locator("[data-testid=card-markdown]").inner_text()
        size = page.evaluate("() => { const i = document.querySelector('[data-testid=plot]'); "
                             "return new Promise(r => i.complete ? r([i.naturalWidth, i.naturalHeight]) : "
                             "i.onload = () => r([i.naturalWidth, i.naturalHeight])); }")
        assert size[0] > 100 and size[1] > 100  # the real PNG decoded in the browser
        assert not outside and not errors, (outside, errors)
    # The server side: the card lists only linked PNGs under the project; the key guards the card and plots.
    with served_fake.served(FakeEngine(SCRIPT), reg, api_key="sesame") as srv:
        h = {"Authorization": "Bearer sesame"}
        card = httpx.get(srv.url + "/v1/heads/H/card", headers=h).json()
        assert [p["title"] for p in card["plots"]] == ["training curves"]
        assert httpx.get(srv.url + "/v1/heads/H/plots/0", headers=h).content == png.read_bytes()
        assert httpx.get(srv.url + "/v1/heads/H/plots/1", headers=h).status_code == 404
        assert httpx.get(srv.url + "/v1/heads/H/plots/0").status_code == 401
        assert httpx.get(srv.url + "/v1/heads/nope/card", headers=h).status_code == 404
        assert httpx.get(srv.url + "/playground").status_code == 200  # the page itself holds no data
    with served_fake.served(FakeEngine(SCRIPT), reg, playground=False) as srv:
        assert httpx.get(srv.url + "/playground").status_code == 404


def test_pruned_candidates_are_shown_as_pruned_with_the_checkpoint(browser):
    prefixes = {"Th": (0.1, 0, 0, 0), "I ": (0.8, 0, 0, 0), "B,": (0.5, 0, 0, 0)}
    with served_fake.served(FakeEngine(SCRIPT, prefixes=prefixes), registry_with(linear_head("A", [1, 0, 0, 0]))) as srv:
        page, outside, errors = open_page(browser, srv.url)
        page.wait_for_selector("#ch-A")
        page.fill("[data-testid=prompt]", "Which?")
        page.evaluate("() => { const f = rerankBody; window.rerankBody = () => ({...f(), prune: {at: [2], keep: 0.5}}); }")
        page.click("[data-testid=send]")
        page.wait_for_selector("[data-testid=prune-info]")
        info = page.locator("[data-testid=prune-info]").inner_text()
        assert "2 tokens: 4 live, dropped [0, 1]" in info, info
        pruned = page.locator(".card.pruned").all()
        assert sorted(p.get_attribute("data-index") for p in pruned) == ["0", "1"]
        assert page.locator("[data-chosen=true]").get_attribute("data-index") == "2"
        assert not outside and not errors, (outside, errors)


def test_the_model_s_own_confidence_with_no_head_and_deepconf_s_online_stop(browser):
    """No head loaded: the confidence rule picks the candidate the model is surest of, every card shows its
    confidences (the fake engine's per-character DeepConf confidences 2, 1, 3, 0.5), and DeepConf's online stop
    (warm-up 2, window 8: threshold 1.1 from lowest groups 2.0 and 1.0) stops candidate 3 after 8 tokens."""
    conf = {s.text: [c] * len(s.text) for s, c in zip(SCRIPT, (2.0, 1.0, 3.0, 0.5))}
    with served_fake.served(FakeEngine(SCRIPT, token_confidence=conf), registry_with()) as srv:
        page, outside, errors = open_page(browser, srv.url)
        page.fill("[data-testid=prompt]", "Which?")
        page.select_option("[data-testid=select]", "confidence")
        page.uncheck("[data-testid=stream]")
        page.check("[data-testid=online]")
        page.click("[data-testid=send]")
        page.wait_for_selector("[data-testid=confidence-info]")
        info = page.locator("[data-testid=confidence-info]").inner_text()
        assert "ranked by deepconf" in info and "threshold 1.1000 from 2 warm-up candidates, 1 stopped after 8 tokens" in info, info
        assert page.locator("[data-chosen=true]").get_attribute("data-index") == "2"
        shown = {c.get_attribute("data-index"): c.locator("[data-testid=candidate-confidence]").inner_text()
                 for c in page.locator("[data-testid=candidate]").all()}
        assert "DeepConf 3.0000" in shown["2"] and "DeepConf 2.0000" in shown["0"], shown
        assert page.locator(".card.pruned").get_attribute("data-index") == "3"
        assert not outside and not errors, (outside, errors)
