"""The page at `/` in a real headless Chromium (Debian's package, driven by Playwright): type, generate, watch."""

from __future__ import annotations

import os
import shutil

import pytest
from serveserver import ServeProcess, make_model

from gpt2load import GPTConfig

playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra's playwright is not installed")

TINY = GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_heads=2, n_layers=2)


def _chromium() -> str:
    """Playwright cannot download its own browsers here; use the system's Chromium."""
    for name in (os.environ.get("GPT2LOAD_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = name and shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium binary (install Debian's chromium package, as .ci/run does, or set GPT2LOAD_CHROMIUM)")


@pytest.mark.parametrize("api_key", [None, "page-key"])
def test_page_streams_a_completion(tmp_path, api_key):
    folder = make_model(tmp_path / "tiny", TINY)
    args = ["--model", str(folder)] + (["--api-key", api_key] if api_key else [])
    with ServeProcess(*args) as server, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            if api_key:  # the page asks for the key when /v1 answers 401
                page.wait_for_selector("#api-key", state="visible")
                page.fill("#api-key", api_key)
            page.fill("#prompt", "Every effort moves you")
            page.fill("#max-tokens", "200")
            page.click("#generate")
            completion = page.locator("#completion")
            page.wait_for_function("document.querySelector('#completion')?.textContent.length > 0")
            first = completion.text_content()
            page.wait_for_function("!document.querySelector('#generate').disabled", timeout=60_000)
            final = completion.text_content()
            assert final.startswith(first) and len(final) > 0
            assert "tokens/s" in page.text_content("#stats") and page.text_content("#error") == ""
            assert page.text_content("#model").endswith("tiny")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 1000
        finally:
            browser.close()
