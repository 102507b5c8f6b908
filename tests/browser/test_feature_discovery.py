"""Finding features and setting coefficients in a real browser against a real server, SmolLM2 and the demo SAE.

Ranked search by meaning with its "N of M" count and Load more, the features active on a prompt added with one click, a
typed coefficient that moves the slider and is the one the run stores, the control-run warning, Select All
within the layer limit; then screenshots of the panel after a completed run at 1440 and 390 px.
"""

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.browser.test_steering_panel import log_in, wait_for_result

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

PLANET, SEA = 1681, 1163
PLANETS = "The planets of the solar system orbit the Sun: Mars, Venus and Earth."
FIRST_MODEL_SECONDS = 600  # the server loads SmolLM2 and the SAE on the first request that needs them
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"


def result_ids(page, container: str) -> list[int]:
    return [
        int(value)
        for value in page.locator(f"{container} .feature-result").evaluate_all(
            "rows => rows.map(row => row.dataset.featureId)"
        )
    ]


def open_fresh_panel(page, server):
    """Signed in, on an empty panel: /steering/ alone reopens the user's last run, which an earlier test made."""
    log_in(page, server)
    page.goto(f"{server.url}/steering/?training={server.seed['training']}")


def search_and_add(page, query: str, index: int):
    page.fill("#feature-search", query)
    page.locator(f'#feature-results .feature-result[data-feature-id="{index}"] .btn-add').click()
    card = page.locator(f'#selected-features .feature-card[data-feature-id="{index}"]')
    card.wait_for()
    return card


def test_it_ranks_the_feature_named_by_the_word_first_and_says_how_many_match(page, server):
    open_fresh_panel(page, server)

    page.fill("#feature-search", "planet")
    expect(page.locator("#feature-results-count")).to_contain_text("features match “planet”, best first")
    assert result_ids(page, "#feature-results")[0] == PLANET

    page.fill("#feature-search", "sea")
    expect(page.locator("#feature-results-count")).to_contain_text("features match “sea”")
    count = page.locator("#feature-results-count").inner_text()
    total = int(count.split(" of ")[1].split()[0])
    assert count.startswith("20 of ") and total > 40, count
    assert result_ids(page, "#feature-results")[0] == SEA
    page.click("#feature-results-more")
    expect(page.locator("#feature-results-count")).to_contain_text(f"40 of {total}")
    ids = result_ids(page, "#feature-results")
    assert len(ids) == 40 and len(set(ids)) == 40 and ids[0] == SEA

    first = page.locator("#feature-results .feature-result").first
    first.locator("summary").click()  # the details: top tokens and the strongest snippets
    expect(first.locator(".token-list")).to_contain_text("ocean")
    assert first.locator(".snippets mark").count() >= 1


def test_it_finds_features_by_meaning(page, server):
    open_fresh_panel(page, server)

    page.locator("#feature-search").press_sequentially("planets", delay=30)  # no label holds the word
    expect(page.locator("#feature-results-count")).to_contain_text("features match “planets”")
    assert result_ids(page, "#feature-results")[0] == PLANET
    expect(page.locator("#feature-results .feature-result").first).to_contain_text(
        '"planet" (Mars, earth, flora)'
    )

    page.fill("#feature-search", "ocean")
    expect(page.locator("#feature-results-count")).to_contain_text("features match “ocean”")
    assert SEA in result_ids(page, "#feature-results")[:3]


def test_a_typed_search_asks_once_the_typing_pauses_and_shows_the_last_query(page, server):
    open_fresh_panel(page, server)
    asked = []
    page.on(
        "request",
        lambda request: (
            asked.append(parse_qs(urlparse(request.url).query)["q"][0])
            if urlparse(request.url).path.endswith("/features/")
            else None
        ),
    )

    page.locator("#feature-search").press_sequentially("planet", delay=30)

    expect(page.locator("#feature-results-count")).to_contain_text("features match “planet”, best first")
    # One search for the word, not one a keystroke (two if the machine stalled mid-typing).
    assert asked[-1] == "planet" and len(asked) <= 2, asked


def test_a_feature_active_on_the_prompt_is_added_with_one_click(page, server):
    open_fresh_panel(page, server)
    page.fill("#prompt", PLANETS)

    page.click("#prompt-features-button")
    page.locator("#prompt-features .feature-result").first.wait_for(timeout=FIRST_MODEL_SECONDS * 1000)
    listed = result_ids(page, "#prompt-features")
    assert PLANET in listed and len(listed) == 20, listed
    # All 20 in the page's own scroll, not 3 in a box of their own.
    assert page.locator("#prompt-features").evaluate("box => box.scrollHeight <= box.clientHeight")
    row = page.locator(f'#prompt-features .feature-result[data-feature-id="{PLANET}"]')
    expect(row).to_contain_text('"planet" (Mars, earth, flora)')
    row.locator(".btn-add").click()

    card = page.locator(f'#selected-features .feature-card[data-feature-id="{PLANET}"]')
    card.wait_for()
    expect(card.locator(".coefficient-value")).to_have_text("2.00")  # a new feature starts at Amplify
    expect(row.locator(".btn-add")).to_have_text("Added")
    expect(page.locator("#feature-count")).to_have_text("1")


def test_it_asks_for_a_prompt_before_listing_its_features(page, server):
    open_fresh_panel(page, server)

    page.click("#prompt-features-button")

    expect(page.locator("#prompt-features-error")).to_contain_text("prompt is empty")


def test_a_typed_coefficient_moves_the_slider_and_is_the_one_the_run_stores(page, server):
    open_fresh_panel(page, server)
    card = search_and_add(page, "planet", PLANET)
    slider = card.locator('input[name="coefficient"]')
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("-5", "5")

    card.locator(".coefficient-number").fill("12")

    assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.input_value()) == (
        "-12",
        "12",
        "12",
    )
    expect(card.locator(".scale-min")).to_have_text("−12 (suppress)")
    expect(card.locator(".scale-max")).to_have_text("+12 (amplify)")
    expect(card.locator(".coefficient-value")).to_have_text("12.00")
    card.locator(".coefficient-number").fill("150")  # past the training's limit of 100
    expect(card.locator(".coefficient-error")).to_contain_text("limit of this training is ±100")
    card.locator(".coefficient-number").fill("12")
    expect(card.locator(".coefficient-error")).to_have_text("")

    page.fill("#prompt", "The sky at night")
    page.fill("#max-tokens", "4")
    page.fill("#seed", "5")
    page.click("#generate-button")
    run_id = page.locator("#run-result[data-run-id]").get_attribute("data-run-id")
    stored = page.request.get(f"{server.url}/api/steering/runs/{run_id}").json()
    assert stored["settings"]["features"] == [{"feature_id": PLANET, "coefficient": 12.0}]
    wait_for_result(page, FIRST_MODEL_SECONDS)


def test_the_panel_says_when_every_coefficient_is_zero(page, server):
    open_fresh_panel(page, server)
    notice = page.locator("#control-run-notice")
    card = search_and_add(page, "planet", PLANET)
    expect(notice).to_be_hidden()

    card.get_by_role("button", name="Reset").click()
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("control run, both texts will match")

    other = search_and_add(page, "sea", SEA)  # a second feature, at Amplify: steering again
    expect(notice).to_be_hidden()
    other.locator(".coefficient-number").fill("0")
    expect(notice).to_be_visible()
    card.locator(".coefficient-number").fill("0.5")
    expect(notice).to_be_hidden()
    card.locator('[data-action="remove-feature"]').click()
    expect(notice).to_be_visible()  # the one left is at 0


def test_select_all_stays_within_the_layer_limit(page, server):
    open_fresh_panel(page, server)

    page.click('[data-action="select-all-layers"]')

    checked = page.locator('#layers input[name="layers"]:checked').evaluate_all(
        "boxes => boxes.map(b => +b.value)"
    )
    assert checked == list(range(20))  # 20 of the 30 layers, the SAE's L10 among them
    expect(page.locator("#layer-count")).to_have_text("20")


def test_screenshots_of_the_panel_after_a_completed_run(page, server, capsys):
    open_fresh_panel(page, server)
    search_and_add(page, "planet", PLANET)
    page.fill("#prompt", "Tell me about your day.")
    page.fill("#max-tokens", "12")
    page.fill("#seed", "3")
    page.check('input[name="chat"]')
    page.click("#generate-button")
    wait_for_result(page, FIRST_MODEL_SECONDS)
    expect(page.locator(".metric-card")).to_have_count(4)
    expect(page.locator('.activation [data-reading="in-run"]')).to_contain_text("in the steered run")

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    paths = []
    for width in (1440, 390):
        page.set_viewport_size({"width": width, "height": 900})
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{width} px: {overflow} px wider than the window"
        path = SCREENSHOTS / f"panel-after-run-{width}.png"
        page.screenshot(path=str(path), full_page=True)
        paths.append(path)

    # At 390 px the top bar is one line, and the runs table keeps its Status column on screen.
    brand, logout = (
        page.locator(".topbar .brand").bounding_box(),
        page.locator(".topbar button.link").bounding_box(),
    )
    assert abs(brand["y"] + brand["height"] / 2 - (logout["y"] + logout["height"] / 2)) < 4, (brand, logout)
    page.goto(f"{server.url}/steering/runs/")
    status = page.locator("table.runs th", has_text="Status").bounding_box()
    assert status["x"] + status["width"] <= 390, status
    path = SCREENSHOTS / "runs-390.png"
    page.screenshot(path=str(path), full_page=True)
    paths.append(path)

    icon = page.request.get(f"{server.url}/favicon.ico")
    assert icon.ok and icon.headers["content-type"] == "image/svg+xml"
    with capsys.disabled():
        print("\n[browser] screenshots: " + ", ".join(str(path) for path in paths))
