"""The panel explains itself (issue 23): the method's texts and buttons, the layers multiplicative steering cannot
use, the max tokens the worker's slots allow (refused before any run exists), a sweep that survives a reload,
and a stored sweep's table (an unsteered baseline row, the coefficients each variant used) at 1440 and 390 px.

None of these generates text: the stored sweep is written into the server's database directly, so no test
here waits for the model (only the web process's tokenizer counts the refused prompt).
"""

import json

import pytest

from tests import processes
from tests.browser.conftest import server_environment
from tests.browser.test_sharing import count_runs_of, url_has
from tests.browser.test_steering_panel import log_in

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

# Run with `manage.py shell -c` in the server's environment: a completed sweep of alice's, two features.
SWEEP_RUN = """
import json
from django.contrib.auth import get_user_model
from django.utils import timezone
from steering_app.models import Feature, SteeringRun, Training
from tests.fake_engine import fake_scores

training = Training.objects.get(pk={training})
second = Feature.objects.filter(training=training).exclude(index={feature}).order_by("index").first().index
activation = [{{"feature_id": {feature}, "unsteered": 0.9, "steered": 3.1}}]
variants = [
    {{"multiplier": m, "steered_output": f"Steered text number {{m:g}} about the planets and the stars.",
      "scores": fake_scores(m), "tokens": 12,
      "metrics": {{"kl_divergence": 0.1 * m, "perplexity_unsteered": 7.25, "perplexity_steered": 7.25 + m,
                  "semantic_similarity": 0.9 - 0.1 * m, "word_overlap": 0.5, "feature_activation": activation}}}}
    for m in (0.5, 1.0, 2.0, 4.0)
]
run = SteeringRun.objects.create(
    owner=get_user_model().objects.get(username={alice!r}), training=training, prompt="Tell me about the sky.",
    seed=7, max_tokens=12, intervention_layers=[training.hook_layer], sweep=[0.5, 1.0, 2.0, 4.0],
    features=[{{"feature_id": {feature}, "coefficient": 1.5}}, {{"feature_id": second, "coefficient": -1.0}}],
    status="completed", unsteered_output="The sky is blue and wide over the quiet hills.",
    steered_output=variants[0]["steered_output"], metrics=variants[0]["metrics"], variants=variants,
    started_at=timezone.now(), finished_at=timezone.now())
print(json.dumps({{"run": run.pk, "second": second}}))
"""


def open_panel(page, server, **query):
    seed = server.seed
    params = "&".join(f"{name}={value}" for name, value in query.items())
    page.goto(
        f"{server.url}/steering/?training={seed['training']}&feature_id={seed['feature']}&coefficient=1&{params}"
    )
    card = page.locator(f'#selected-features .feature-card[data-feature-id="{seed["feature"]}"]')
    card.wait_for()
    return card


def test_multiplicative_steering_explains_its_coefficients_and_disables_the_other_layers(page, server):
    log_in(page, server)
    card = open_panel(page, server, prompt="Hello")
    sae_layer = page.locator("#method").get_attribute("data-sae-layer")
    expect(card.locator(".card-method-text:visible")).to_contain_text("additive steering adds coefficient ×")
    card.get_by_role("button", name="Suppress").click()
    expect(card.locator(".coefficient-value")).to_have_text("-2.00")
    page.locator(f'#layers input[name="layers"][value="{int(sae_layer) - 1}"]').check()
    url_has(page, "layers", str(int(sae_layer) - 1))

    page.select_option("#method", "multiplicative")

    reason = page.locator("#layers-multiplicative")
    expect(reason).to_contain_text(f"acts only at the SAE's layer L{sae_layer}")
    boxes = page.locator('#layers input[name="layers"]')
    disabled = page.locator('#layers input[name="layers"]:disabled')
    expect(disabled).to_have_count(boxes.count() - 1)
    sae_box = page.locator(f'#layers input[name="layers"][value="{sae_layer}"]')
    assert sae_box.is_enabled() and sae_box.is_checked()
    expect(page.locator("#method-hint-multiplicative")).to_contain_text(
        "−1 ablates the feature, 0 leaves it, 1 doubles it"
    )
    expect(page.locator("#method-hint-additive")).to_be_hidden()
    expect(card.locator(".scale-multiplicative")).to_have_text(
        "−1 ablates the feature0 leaves it1 doubles it, 2 triples it"
    )
    expect(card.locator(".card-method-text:visible")).to_contain_text("(1 + coefficient) × f")
    card.get_by_role("button", name="Suppress (ablate)").click()
    expect(card.locator(".coefficient-value")).to_have_text("-1.00")
    card.get_by_role("button", name="Amplify").click()
    expect(card.locator(".coefficient-value")).to_have_text("2.00")
    url_has(page, "method", "multiplicative")
    page.wait_for_function(  # the disabled layer is no longer sent, nor written into the URL
        "(layer) => new URLSearchParams(window.location.search).getAll('layers').join() === layer",
        arg=sae_layer,
    )

    page.reload()  # the URL's method renders the same grid and texts
    expect(page.locator('#layers input[name="layers"]:disabled')).to_have_count(boxes.count() - 1)
    expect(card.locator(".scale-multiplicative")).to_be_visible()

    page.select_option("#method", "additive")
    expect(page.locator("#layers-multiplicative")).to_have_count(0)
    expect(page.locator('#layers input[name="layers"]:disabled')).to_have_count(0)
    card.get_by_role("button", name="Suppress").click()
    expect(card.locator(".coefficient-value")).to_have_text("-2.00")


def test_max_tokens_beyond_the_slots_is_refused_with_the_maximum_and_no_run(page, server):
    log_in(page, server)
    open_panel(page, server, prompt="Tell+me+about+the+weather+in+the+mountains.")
    # The hint asks for this prompt's own maximum as the panel opens with it.
    expect(page.locator("#max-tokens-hint")).to_contain_text(
        "-token prompt: the worker's 512-token slots hold the prompt too"
    )
    shown = int(page.locator("#max-tokens-limit").inner_text())
    runs_before = count_runs_of(server, server.username)

    page.fill("#max-tokens", "512")
    page.click("#generate-button")

    slot = page.locator("#error-max_tokens")
    expect(slot).to_contain_text("max_tokens can be at most")
    allowed = int(slot.inner_text().split("at most ")[1].split()[0])
    assert 400 < allowed < 512 and allowed == shown  # 512 minus the prompt's few tokens, as the hint said
    expect(page.locator("#form-errors")).to_contain_text(f"Max Tokens: max_tokens can be at most {allowed}")
    assert count_runs_of(server, server.username) == runs_before


def test_a_sweep_and_its_edited_multipliers_survive_a_reload(page, server):
    log_in(page, server)
    open_panel(page, server, prompt="Hello")
    multipliers = page.locator("#sweep-multipliers")
    expect(multipliers).to_be_disabled()  # not sent while the box is unticked

    page.check("#sweep")
    page.fill("#sweep-multipliers", "0.5, 3")
    url_has(page, "sweep", "0.5, 3")
    page.reload()

    assert page.locator("#sweep").is_checked()
    expect(multipliers).to_be_enabled()
    expect(multipliers).to_have_value("0.5, 3")
    page.uncheck("#sweep")
    page.wait_for_function("() => !new URLSearchParams(window.location.search).has('sweep')")
    page.reload()
    assert not page.locator("#sweep").is_checked()


COLUMN_BOXES = """
() => Array.from(document.querySelectorAll("#run-result .outputs .output-column")).map((column) => {
  const box = column.getBoundingClientRect();
  return {left: box.left, right: box.right, top: box.top};
})
"""


def test_a_stored_sweeps_table_shows_the_baseline_and_the_coefficients_at_1440_and_390_px(
    page, server, tmp_path, capsys
):
    env = server_environment(server.log.parent)
    code = SWEEP_RUN.format(
        training=server.seed["training"], feature=server.seed["feature"], alice=server.username
    )
    stored = json.loads(processes.manage(env, "shell", "-c", code).strip().splitlines()[-1])
    feature, second = server.seed["feature"], stored["second"]
    log_in(page, server)
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{server.url}/steering/runs/{stored['run']}/")

    rows = page.locator("#sweep-result tbody tr")
    expect(rows).to_have_count(5)
    baseline = rows.nth(0)
    expect(baseline.locator(".sweep-strength")).to_have_text("unsteered")
    expect(baseline.locator(".sweep-coefficients")).to_have_text(f"#{feature} 0, #{second} 0")
    expect(baseline.locator('td[data-label="Perplexity"]')).to_have_text("7.25")
    used = [rows.nth(i).locator(".sweep-coefficients").inner_text() for i in range(1, 5)]
    assert used == [
        f"#{feature} 0.75, #{second} -0.5",
        f"#{feature} 1.5, #{second} -1",
        f"#{feature} 3, #{second} -2",
        f"#{feature} 6, #{second} -4",
    ]
    expect(page.locator("#sweep-x-title")).to_contain_text("strength")
    expect(page.locator("#sweep-y-title")).to_have_text("score (0 to 1)")
    width = page.evaluate("document.documentElement.clientWidth")
    columns = page.evaluate(COLUMN_BOXES)
    assert len(columns) == 5 and all(column["right"] <= width for column in columns)  # ×4 is on screen
    assert len({round(column["top"]) for column in columns}) == 1  # side by side
    table = page.locator("#sweep-result .sweep-table").bounding_box()
    assert table["x"] + table["width"] <= width  # every column of the table too
    chart = page.locator("#sweep-result svg").bounding_box()
    panel = page.locator("#sweep-result").bounding_box()
    assert chart["width"] > 0.9 * (panel["width"] - 64)  # the chart spans the panel
    wide = tmp_path / "sweep-1440.png"
    page.locator("#run-result").screenshot(path=str(wide))

    page.set_viewport_size({"width": 390, "height": 844})
    columns = page.evaluate(COLUMN_BOXES)
    assert len({round(column["left"]) for column in columns}) == 1  # stacked
    assert page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0
    narrow = tmp_path / "sweep-390.png"
    page.locator("#run-result").screenshot(path=str(narrow))
    with capsys.disabled():
        print(f"\n[browser] sweep screenshots: {wide} {narrow}")
