"""A first run shows its model's load in a real browser (issue 23): a run that waits for a model still loading
sees "loading <model> … N %" on its status line, then generates.

The loading is a tiny random Llama's (with SmolLM2's tokenizer and a random SAE), which the session server's seed
registers with its training pending: the worker loads the models of completed trainings as it starts, so none
has loaded this one when the test completes its training in the running server's database. Its first run loads
it, in a second or two, and its page must show that load's progress. SmolLM2 itself is not loaded again for this.
"""

import sqlite3

import pytest

from tests.browser.test_steering_panel import log_in, wait_for_result

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

RUN_SECONDS = 180  # the tiny model's load and step plan on a busy CPU (the server may still warm SmolLM2)

# Every text the run's status line shows, recorded as it changes: the load's steps may pass in a second.
WATCH_STATUS = """() => {
  window.statusTexts = [];
  new MutationObserver(() => {
    const status = document.getElementById("run-status");
    const text = status ? status.textContent.replace(/\\s+/g, " ").trim() : "";
    if (text && window.statusTexts[window.statusTexts.length - 1] !== text) window.statusTexts.push(text);
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def tiny_training(server) -> dict:
    """The seed's tiny model, its training completed now in the running server's database: name and training."""
    tiny = server.seed["loading_model"]
    with sqlite3.connect(server.log.parent / "db.sqlite3") as connection:
        connection.execute(
            "UPDATE steering_app_training SET status = 'completed' WHERE id = ?", (tiny["training"],)
        )
    return tiny


def test_a_first_run_shows_its_models_loading_progress(page, server, tiny_training):
    log_in(page, server)
    page.goto(
        f"{server.url}/steering/?training={tiny_training['training']}&prompt=Hello&feature_id=0&coefficient=1"
        "&layers=1&max_tokens=2&temperature=0&seed=1"
    )
    expect(page.locator("#generate-button")).to_be_enabled()
    page.evaluate(WATCH_STATUS)

    page.click("#generate-button")
    wait_for_result(page, RUN_SECONDS)

    seen = page.evaluate("window.statusTexts")
    loading = [text for text in seen if text.startswith(f"loading {tiny_training['name']} … ")]
    assert loading, f"no loading line among the statuses shown: {seen}\n{server.log_tail()}"
    percents = [int(text.split(" … ")[1].split(" %")[0]) for text in loading]
    assert percents == sorted(percents) and 0 <= percents[0] < 100, loading
    assert seen[-1] == "Completed", seen
