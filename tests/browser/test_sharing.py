"""Sharing and reproducing in a real browser (issue 13): a preset that restores the prompt and seed, a reload
that keeps the panel's configuration, a second member opening a shared run read-only and re-running it as
their own, and a private run answering the styled 404 to another member.

Two members, alice (the server fixture's user) and bob; alice's runs are stored directly in the server's
database (no model needed to show a stored run). Rows are checked in the server's own SQLite file.
"""

import json
import sqlite3

import pytest

from tests import processes
from tests.browser.conftest import server_environment
from tests.browser.test_steering_panel import PROMPT, log_in, prepare_comparison, wait_for_result

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

BOB, BOB_PASSWORD = "bob", "pw-bob-123"
PRESET_NAME = "Browser sharing preset"
RUN_SECONDS = 600  # cold: the server loads SmolLM2, the SAE and the sentence embedder on its first run

# Run with `manage.py shell -c` in the server's environment: bob, and two finished runs of alice's.
SETUP = """
import json
from django.contrib.auth import get_user_model
from django.utils import timezone
from steering_app.models import SteeringRun, Training

User = get_user_model()
User.objects.create_user({bob!r}, password={password!r})
alice = User.objects.get(username={alice!r})
training = Training.objects.get(pk={training})
def run(**fields):
    values = dict(
        owner=alice, training=training, prompt="Alice asks about the weather.", seed=2024, max_tokens=2,
        features=[{{"feature_id": {feature}, "coefficient": 1.5}}], intervention_layers=[training.hook_layer],
        status="completed", unsteered_output="Clouds, mostly.", steered_output="Rain, rain and rain.",
        started_at=timezone.now(), finished_at=timezone.now())
    return SteeringRun.objects.create(**{{**values, **fields}})
print(json.dumps({{"shared": run().pk, "private": run(private=True, prompt="Alice's secret prompt").pk}}))
"""


@pytest.fixture(scope="module")
def lab(server) -> dict:
    env = server_environment(server.log.parent)
    code = SETUP.format(
        bob=BOB,
        password=BOB_PASSWORD,
        alice=server.username,
        training=server.seed["training"],
        feature=server.seed["feature"],
    )
    return json.loads(processes.manage(env, "shell", "-c", code).strip().splitlines()[-1])


def query(server, sql: str, *args) -> list[tuple]:
    connection = sqlite3.connect(server.log.parent / "db.sqlite3")
    try:
        return connection.execute(sql, args).fetchall()
    finally:
        connection.close()


def count_runs_of(server, username: str) -> int:
    [(runs,)] = query(
        server,
        "SELECT count(*) FROM steering_app_steeringrun JOIN auth_user ON auth_user.id = owner_id "
        "WHERE username = ?",
        username,
    )
    return runs


def log_in_as(page, server, username: str, password: str, path: str):
    page.goto(f"{server.url}/login/?next={path}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}{path}")


def url_has(page, name: str, value: str):
    """Until the panel's script has written `name=value` into the address bar."""
    page.wait_for_function(
        "([name, value]) => new URLSearchParams(window.location.search).getAll(name).includes(value)",
        arg=[name, value],
    )


def test_a_preset_restores_the_prompt_and_the_seed(page, server):
    log_in(page, server)
    prepare_comparison(page, server, max_tokens=8)  # feature amplified, prompt, seed 1234, chat on
    page.locator("#presets-body input[name=preset_name]").wait_for()
    page.fill("input[name=preset_name]", PRESET_NAME)
    page.click("#preset-save-button")
    listed = page.locator("#presets-body li.preset", has_text=PRESET_NAME)
    listed.wait_for()
    [(prompt, seed, chat)] = query(
        server, "SELECT prompt, seed, chat FROM presets_app_steeringpreset WHERE name = ?", PRESET_NAME
    )
    assert (prompt, seed, chat) == (PROMPT, 1234, 1)

    page.goto(f"{server.url}/steering/?training={server.seed['training']}")  # an empty panel
    expect(page.locator("#prompt")).to_have_value("")
    listed = page.locator("#presets-body li.preset", has_text=PRESET_NAME)
    preset_id = listed.get_attribute("id").removeprefix("preset-")
    listed.get_by_role("link", name="Load").click()
    page.wait_for_url(f"**/steering/?preset={preset_id}")

    expect(page.locator("#prompt")).to_have_value(PROMPT)
    expect(page.locator("#seed")).to_have_value("1234")
    assert page.locator('input[name="chat"]').is_checked()
    expect(page.locator("#loaded-preset .preset-loaded-name")).to_have_text(PRESET_NAME)
    card = page.locator(f'#selected-features .feature-card[data-feature-id="{server.seed["feature"]}"]')
    expect(card.locator(".coefficient-value")).to_have_text("2.00")


def test_a_reload_keeps_the_configuration(page, server):
    seed = server.seed
    log_in(page, server)
    prepare_comparison(page, server, max_tokens=9)  # feature at 2.00, prompt, seed 1234, chat on
    sae_layer = int(page.locator("#method").get_attribute("data-sae-layer"))
    other_layer = str(sae_layer - 1)
    page.locator(f'#layers input[name="layers"][value="{other_layer}"]').check()
    page.fill("#temperature", "0.3")
    page.fill("#seed", "4242")
    page.check('input[name="private"]')
    url_has(page, "seed", "4242")
    url_has(page, "layers", other_layer)
    url_has(page, "private", "1")

    page.reload()

    expect(page.locator("#prompt")).to_have_value(PROMPT)
    expect(page.locator("#seed")).to_have_value("4242")
    expect(page.locator("#temperature")).to_have_value("0.3")
    expect(page.locator("#max-tokens")).to_have_value("9")
    assert page.locator('input[name="chat"]').is_checked()
    assert page.locator('input[name="private"]').is_checked()
    checked = page.locator('#layers input[name="layers"]:checked')
    assert sorted(int(box.get_attribute("value")) for box in checked.all()) == [sae_layer - 1, sae_layer]
    card = page.locator(f'#selected-features .feature-card[data-feature-id="{seed["feature"]}"]')
    expect(card.locator(".coefficient-value")).to_have_text("2.00")
    expect(page.locator("#feature-count")).to_have_text("1")
    assert page.locator(".link-note").count() == 0  # nothing in the URL was refused

    # Removing the feature is part of the configuration too.
    card.get_by_role("button", name=f"Remove feature #{seed['feature']}").click()
    page.wait_for_function("() => !new URLSearchParams(window.location.search).has('feature_id')")
    page.reload()
    expect(page.locator("#feature-count")).to_have_text("0")
    expect(page.locator("#prompt")).to_have_value(PROMPT)


def test_a_second_member_opens_a_shared_run_read_only_and_reruns_it_as_their_own(page, server, lab):
    shared = lab["shared"]
    log_in_as(page, server, BOB, BOB_PASSWORD, f"/steering/runs/{shared}/")

    expect(page.locator("h1")).to_have_text(f"Steering run #{shared}")
    expect(page.locator("#steered-output")).to_have_text("Rain, rain and rain.")
    expect(page.locator("#run-visibility")).to_contain_text("Shared by alice")
    assert page.locator("#toggle-private").count() == 0 and page.locator("#delete-run").count() == 0

    page.click("#rerun")
    page.wait_for_url(f"**/steering/?run={shared}")
    expect(page.locator("#prompt")).to_have_value("Alice asks about the weather.")
    expect(page.locator("#seed")).to_have_value("2024")
    expect(page.locator("#loaded-run")).to_contain_text("by alice")
    expect(page.locator("#generate-button")).to_be_enabled()
    alices_runs_before = count_runs_of(server, server.username)
    page.click("#generate-button")
    page.locator("#run-result[data-run-id]").wait_for()
    new_run = int(page.locator("#run-result").get_attribute("data-run-id"))

    [(owner, prompt, seed)] = query(
        server,
        "SELECT auth_user.username, prompt, seed FROM steering_app_steeringrun "
        "JOIN auth_user ON auth_user.id = owner_id WHERE steering_app_steeringrun.id = ?",
        new_run,
    )
    assert new_run != shared and (owner, prompt, seed) == (BOB, "Alice asks about the weather.", 2024)
    assert count_runs_of(server, server.username) == alices_runs_before  # nothing was added to alice's
    wait_for_result(page, RUN_SECONDS)  # bob's run completes
    expect(page.locator("#stop-run")).to_have_count(0)


def test_a_private_run_answers_the_styled_404_to_another_member(page, server, lab):
    private = lab["private"]
    log_in_as(page, server, BOB, BOB_PASSWORD, "/steering/runs/")

    response = page.goto(f"{server.url}/steering/runs/{private}/")

    assert response.status == 404
    expect(page.locator("h1")).to_have_text("Not found")
    expect(page.locator("header.topbar nav")).to_contain_text("Log out (bob)")  # inside the site's layout
    assert page.locator(".error-panel").evaluate("e => getComputedStyle(e).textAlign") == "center"  # styled
    assert "secret" not in page.content()
    assert page.goto(f"{server.url}/api/steering/runs/{private}").status == 404
    # Its owner still reads it.
    page.context.clear_cookies()
    log_in_as(page, server, server.username, server.password, f"/steering/runs/{private}/")
    expect(page.locator("#run-visibility")).to_contain_text("Private")
