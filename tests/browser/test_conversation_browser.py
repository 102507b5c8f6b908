"""Chat mode in a real browser (issue 21): alice starts a conversation from the panel on the demo model, sends three
messages (each turn's two replies stream in over its run's websocket), raises the coefficient before the third,
which the page marks; then carol, another member, continues from turn 2 into a conversation of her own.

Rows are checked in the server's own SQLite file; the model is the real SmolLM2-Instruct, with 8 tokens a reply.
"""

import json

import pytest

from tests import processes
from tests.browser.conftest import server_environment
from tests.browser.test_sharing import log_in_as, query
from tests.browser.test_steering_panel import (
    FIRST_RUN_SECONDS,
    WARM_RUN_SECONDS,
    log_in,
    prepare_comparison,
    wait_for_result,
)

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

CAROL, CAROL_PASSWORD = "carol", "pw-carol-123"
SYSTEM_PROMPT = "You are a friendly guide to the night sky."
MESSAGES = ("Hello! What can you tell me?", "Which one is the closest?", "And the farthest?")

ADD_MEMBER = """
from django.contrib.auth import get_user_model
User = get_user_model()
if not User.objects.filter(username={name!r}).exists():
    User.objects.create_user({name!r}, password={password!r})
"""


@pytest.fixture(scope="module")
def carol(server) -> None:
    env = server_environment(server.log.parent)
    processes.manage(env, "shell", "-c", ADD_MEMBER.format(name=CAROL, password=CAROL_PASSWORD))


def send(page, turn: int, content: str, seconds: float):
    """Send a message and wait for its turn to end: streamed in (the run's result area), or already stored when
    the page rendered."""
    page.fill("#message", content)
    with page.expect_navigation():
        page.click("#send-message")
    ended = f'#turn-{turn}:not([data-status="queued"]):not([data-status="running"]), #turn-{turn} #run-result'
    page.locator(ended).first.wait_for()
    if page.locator(f"#turn-{turn} #run-result").count():
        wait_for_result(page, seconds)
    else:
        expect(page.locator(f"#turn-{turn}")).to_have_attribute("data-status", "completed")


def test_three_turns_a_marked_steering_change_and_a_member_continuing_from_turn_2(page, server, carol):
    log_in(page, server)
    prepare_comparison(page, server, max_tokens=8)  # the feature at coefficient 2
    page.click("#chat-mode summary")
    page.fill("#system-prompt", SYSTEM_PROMPT)
    page.click("#start-chat")
    page.wait_for_url("**/steering/conversations/*/")
    conversation = int(page.url.rstrip("/").rsplit("/", 1)[1])
    expect(page.locator("#system-prompt")).to_have_text(SYSTEM_PROMPT)
    feature = server.seed["feature"]
    coefficient = page.locator(f'#message-form input[name="coefficient"][data-feature-id="{feature}"]')
    expect(coefficient).to_have_value("2")

    send(page, 1, MESSAGES[0], FIRST_RUN_SECONDS)  # the server loads the model on its first run
    send(page, 2, MESSAGES[1], WARM_RUN_SECONDS)
    coefficient.fill("4")
    send(page, 3, MESSAGES[2], WARM_RUN_SECONDS)
    page.reload()

    for number, message in enumerate(MESSAGES, start=1):
        turn = page.locator(f"#turn-{number}")
        expect(turn).to_have_attribute("data-status", "completed")
        expect(turn.locator(".turn-user")).to_have_text(message)
        assert turn.locator(".turn-steered").inner_text().strip()
    expect(page.locator(".steering-changed")).to_have_count(1)
    expect(page.locator('.steering-changed[data-turn="3"]')).to_have_text(
        f"Steering changed: #{feature} coefficient 2 → 4"
    )
    rows = query(
        server,
        "SELECT turn, prompt, features FROM steering_app_steeringrun WHERE conversation_id = ? ORDER BY turn",
        conversation,
    )
    assert [(turn, prompt) for turn, prompt, _ in rows] == list(enumerate(MESSAGES, start=1))
    assert [json.loads(features)[0]["coefficient"] for _, _, features in rows] == [2.0, 2.0, 4.0]

    page.context.clear_cookies()
    log_in_as(page, server, CAROL, CAROL_PASSWORD, f"/steering/conversations/{conversation}/")
    assert page.locator("#message-form").count() == 0  # read-only for her
    page.click('.continue-from[data-turn="2"]')
    page.wait_for_url("**/steering/conversations/*/")
    copy = int(page.url.rstrip("/").rsplit("/", 1)[1])

    assert copy != conversation
    expect(page.locator("article.turn")).to_have_count(2)
    expect(page.locator("#turn-2 .turn-user")).to_have_text(MESSAGES[1])
    expect(page.locator("#message-form")).to_be_visible()
    [(owner,)] = query(
        server,
        "SELECT username FROM steering_app_conversation JOIN auth_user ON auth_user.id = owner_id "
        "WHERE steering_app_conversation.id = ?",
        copy,
    )
    assert owner == CAROL

    # On a phone the turns stack and nothing runs off the side.
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0
