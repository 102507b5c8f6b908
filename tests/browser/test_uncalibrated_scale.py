"""An uncalibrated training in a real browser: its cards say so, and typing a prompt rescales their sliders
to ±2‖h‖, ‖h‖ measured by the server at the SAE's layer on that prompt, once the typing pauses; a card added
later reuses the measurement."""

import json
import re
import sqlite3
from urllib.parse import parse_qs

import pytest

from tests.browser.test_steering_panel import log_in

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

PROMPT = "Tell me about the weather in the mountains."


@pytest.fixture
def uncalibrated(server):
    """The seeded training without its calibration, restored afterwards: the server is shared by every browser test."""
    database = server.log.parent / "db.sqlite3"
    training = server.seed["training"]
    with sqlite3.connect(database) as connection:
        calibration = connection.execute(
            "SELECT max_activation, id FROM steering_app_feature WHERE training_id = ?", (training,)
        ).fetchall()
        connection.execute(
            "UPDATE steering_app_feature SET max_activation = NULL WHERE training_id = ?", (training,)
        )
    try:
        yield server
    finally:
        with sqlite3.connect(database) as connection:
            connection.executemany(
                "UPDATE steering_app_feature SET max_activation = ? WHERE id = ?", calibration
            )


def test_an_uncalibrated_trainings_sliders_span_twice_the_residual_norm_of_the_prompt(page, uncalibrated):
    server = uncalibrated
    seed = server.seed
    log_in(page, server)
    page.goto(f"{server.url}/steering/?training={seed['training']}")  # not alice's last run: an empty panel
    page.fill("#feature-search", seed["search"])
    result = page.locator(f'#feature-results .feature-result[data-feature-id="{seed["feature"]}"]')
    expect(result).to_contain_text("uncalibrated: c is in residual-stream units")
    result.locator(".btn-add").click()
    card = page.locator(f'#selected-features .feature-card[data-feature-id="{seed["feature"]}"]')
    expect(card).to_have_attribute("data-calibrated", "false")
    slider = card.locator('input[name="coefficient"]')
    assert slider.get_attribute("max") == "5"  # until a prompt is measured

    page.fill("#prompt", PROMPT)

    expect(card.locator(".scale-unit")).to_have_text(re.compile(r"^‖h‖ = [\d.]+ at L\d+$"), timeout=120_000)
    scale_url = f"{server.url}/steering/trainings/{seed['training']}/scale/"
    csrf = json.loads(page.locator("body").get_attribute("hx-headers"))
    norm = page.request.post(scale_url, form={"prompt": PROMPT}, headers=csrf).json()["residual_norm"]
    span = round(2 * norm * 10) / 10
    assert span > 5
    assert float(slider.get_attribute("min")) == -span and float(slider.get_attribute("max")) == span
    card.get_by_role("button", name="Amplify").click()
    assert float(slider.input_value()) == pytest.approx(round(norm * 10) / 10, abs=0.051)


def test_the_prompt_is_measured_once_the_typing_pauses_and_a_card_added_later_reuses_it(page, uncalibrated):
    server = uncalibrated
    log_in(page, server)
    page.goto(f"{server.url}/steering/?training={server.seed['training']}")
    measured = []  # the prompt of every measurement the page asked for
    page.on(
        "request",
        lambda request: (
            measured.append(parse_qs(request.post_data)["prompt"][0]) if "/scale/" in request.url else None
        ),
    )
    page.fill("#feature-search", "planet")
    results = page.locator("#feature-results .feature-result")
    expect(results).to_have_count(15)  # the 14 holding the word, one more near it in meaning
    results.nth(0).locator(".btn-add").click()
    first = page.locator("#selected-features .feature-card").nth(0)
    first.wait_for()

    page.locator("#prompt").press_sequentially(PROMPT, delay=30)

    expect(first.locator(".scale-unit")).to_have_text(re.compile(r"^‖h‖ = [\d.]+ at L\d+$"), timeout=120_000)
    # One measurement of the whole prompt, not one a keystroke (two if the machine stalled mid-typing).
    assert measured[-1] == PROMPT and len(measured) <= 2, measured
    asked = len(measured)
    results.nth(1).locator(".btn-add").click()
    second = page.locator("#selected-features .feature-card").nth(1)
    expect(second.locator(".scale-unit")).to_have_text(first.locator(".scale-unit").inner_text())
    assert second.locator('input[name="coefficient"]').get_attribute("max") == first.locator(
        'input[name="coefficient"]'
    ).get_attribute("max")
    assert len(measured) == asked  # the prompt has not changed: no second forward
