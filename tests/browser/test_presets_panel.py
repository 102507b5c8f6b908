"""Saved presets in a real browser (issue 6): save a preset, reload the page, load it, generate.

Log in, add a feature, Amplify it, save the configuration as a named preset; after a reload the preset is
still listed; its Load link opens the panel filled with it (feature, coefficient, layer); Generate Comparison
runs to the metric cards. The row is checked in the server's own SQLite file.
"""

import json
import sqlite3

import pytest

from tests.browser.test_steering_panel import log_in, prepare_comparison, wait_for_result

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

RUN_SECONDS = 600  # cold: the server loads SmolLM2, the SAE and the sentence embedder on its first run
PRESET_NAME = "Browser weather preset"
PROMPT = "Tell me about the weather in the mountains."
MAX_TOKENS = 8


def stored_presets(server):
    # The server's SQLite file sits next to its log (see conftest.server_environment).
    connection = sqlite3.connect(server.log.parent / "db.sqlite3")
    try:
        return connection.execute(
            "SELECT id, name, features, intervention_layers, max_tokens FROM presets_app_steeringpreset"
        ).fetchall()
    finally:
        connection.close()


def test_save_a_preset_reload_load_it_and_generate(page, server):
    seed = server.seed
    log_in(page, server)
    prepare_comparison(page, server, max_tokens=MAX_TOKENS)
    sae_layer = page.locator("#method").get_attribute("data-sae-layer")
    assert page.locator(f'#layers input[name="layers"][value="{sae_layer}"]').is_checked()

    page.locator("#presets-body input[name=preset_name]").wait_for()
    page.fill("input[name=preset_name]", PRESET_NAME)
    page.click("#preset-save-button")
    listed = page.locator("#presets-body li.preset", has_text=PRESET_NAME)
    listed.wait_for()
    assert page.locator("#presets-body .error").count() == 0, page.locator(
        "#presets-body .error"
    ).inner_text()
    expect(page.locator("#presets-body .notice")).to_be_visible()

    page.reload()
    listed = page.locator("#presets-body li.preset", has_text=PRESET_NAME)
    listed.wait_for()
    expect(listed).to_have_count(1)

    preset_id = listed.get_attribute("id").removeprefix("preset-")
    listed.get_by_role("link", name="Load").click()
    page.wait_for_url(f"**/steering/?preset={preset_id}")

    card = page.locator(f'#selected-features .feature-card[data-feature-id="{seed["feature"]}"]')
    card.wait_for()
    expect(page.locator("#feature-count")).to_have_text("1")
    expect(card.locator(".coefficient-value")).to_have_text("2.00")
    assert page.locator(f'#layers input[name="layers"][value="{sae_layer}"]').is_checked()
    expect(page.locator("#max-tokens")).to_have_value(str(MAX_TOKENS))

    if not page.locator("#prompt").input_value():  # a preset holds no prompt
        page.fill("#prompt", PROMPT)
    page.check('input[name="chat"]')
    expect(page.locator("#generate-button")).to_be_enabled()
    page.click("#generate-button")
    wait_for_result(page, RUN_SECONDS)
    for name in ("KL Divergence", "Perplexity Δ", "Similarity", "Word Overlap"):
        page.locator(".metric-card", has_text=name).wait_for(timeout=120_000)
    assert page.locator("#steered-output").inner_text().strip()

    rows = [row for row in stored_presets(server) if row[1] == PRESET_NAME]
    assert len(rows) == 1, rows
    row_id, _, features, layers, max_tokens = rows[0]
    assert str(row_id) == preset_id
    assert [(f["feature_id"], float(f["coefficient"])) for f in json.loads(features)] == [
        (seed["feature"], 2.0)
    ]
    assert json.loads(layers) == [int(sae_layer)]
    assert max_tokens == MAX_TOKENS
