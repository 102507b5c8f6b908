"""Steering vectors in a real browser against the real server and SmolLM2: paste pairs, watch the worker make the
vector and its separation chart appear, steer with it from the panel, and download it for llama.cpp.

The concept is added to the demo's vector space rather than a new space: a new space would be the newest
completed training, the panel's default for the browser tests that run after this one."""

import re

import pytest

from tests.browser.test_steering_panel import FIRST_RUN_SECONDS, log_in, wait_for_result

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

OCEAN = [
    "The ocean waves crashed against the rocky shore.",
    "Whales swim through the deep blue sea.",
    "Salt water and coral reefs fill the tropical ocean.",
    "Sailors watched the tide roll over the sea at dawn.",
    "Dolphins leapt out of the ocean beside the boat.",
    "The sea breeze carried the smell of salt and seaweed.",
]
DESERT = [
    "The dry wind blew sand across the rocky desert.",
    "Camels walk through the hot empty dunes.",
    "Dust and cactus plants fill the dry valley.",
    "Travellers watched the sun rise over the dunes at dawn.",
    "Lizards hid under the stones beside the road.",
    "The desert air carried the smell of dust and heat.",
]


def test_a_member_makes_a_vector_from_pasted_pairs_steers_with_it_and_downloads_it(page, server):
    space = server.seed["vector_space"]
    log_in(page, server)
    page.goto(f"{server.url}/steering/vectors/new/")
    page.select_option("#id_target", f"space-{space}")
    page.fill("#id_name", "ocean")
    page.fill("#id_positives", "\n".join(OCEAN))
    page.fill("#id_negatives", "\n".join(DESERT))
    page.click("#make-vector")
    page.wait_for_url(f"{server.url}/steering/vectors/{space}/")

    # The page polls while the worker reads the examples (loading the model first when this test runs alone).
    concept = page.locator("section.vector-concept", has_text="ocean")
    concept.wait_for(timeout=FIRST_RUN_SECONDS * 1000)
    expect(concept.locator(".separation-chart rect.bar")).to_have_count(30)
    expect(concept.locator(".separation-chart rect.bar.best")).to_have_count(1)
    best = re.fullmatch(r"L(\d+)", concept.locator(".best-layer").inner_text()).group(1)

    concept.locator("a.steer-with").click()
    page.wait_for_url(re.compile(r".*/steering/\?training=.*"))
    card = page.locator("#selected-features .feature-card")
    expect(card).to_have_count(1)
    expect(card.locator(".coefficient-value")).to_have_text("1.00")
    expect(page.locator(f'.layer-chip input[value="{best}"]')).to_be_checked()
    expect(page.locator('#method option[value="multiplicative"]')).to_be_disabled()
    page.fill("#prompt", "Tell me about your weekend.")
    page.fill("#max-tokens", "8")
    page.check('input[name="chat"]')
    page.click("#generate-button")
    wait_for_result(page, FIRST_RUN_SECONDS)
    assert page.locator("#steered-output").inner_text().strip()

    with page.expect_download() as download:
        page.click("#download-control-vector")
    assert download.value.suggested_filename == f"steerlab-training-{space}-control-vector.gguf"
    with open(download.value.path(), "rb") as file:
        assert file.read(4) == b"GGUF"
