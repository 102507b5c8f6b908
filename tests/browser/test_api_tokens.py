"""The API tokens page in a real browser (issue 23): a member makes a token from the user menu, sees it once,
uses it as a script would (Bearer) and revokes it, after which the API refuses it with 401."""

import pytest

from tests.browser.test_steering_panel import log_in

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

NAME = "browser script"


def test_a_token_is_made_shown_once_used_and_revoked(page, server):
    log_in(page, server)
    page.click(".topbar nav >> text=API tokens")
    page.wait_for_url(f"{server.url}/steering/tokens/")
    expect(page.locator("footer a[href='/api/docs']")).to_be_visible()

    page.fill("input[name=name]", NAME)
    page.click("#new-token-form button[type=submit]")
    raw = page.locator("#new-token-value").inner_text().strip()
    assert raw.startswith("stl_"), raw
    row = page.locator("#api-tokens tr", has_text=NAME)
    expect(row).to_contain_text("never")

    training = f"{server.url}/api/trainings/{server.seed['training']}"
    # A fresh request context: no session cookie, so the token alone must authenticate.
    script = page.context.browser.new_context()
    try:
        headers = {"Authorization": f"Bearer {raw}"}
        assert script.request.get(training, headers=headers).status == 200

        page.goto(f"{server.url}/steering/tokens/")
        expect(page.locator("#new-token-value")).to_have_count(0)  # shown once: not on a later visit
        expect(row).not_to_contain_text("never")  # the API call was its last use

        row.locator("button", has_text="Revoke").click()
        page.wait_for_url(f"{server.url}/steering/tokens/")
        expect(page.locator("#api-tokens tr", has_text=NAME)).to_have_count(0)
        assert script.request.get(training, headers=headers).status == 401
    finally:
        script.close()

    # On a phone the top bar stays one line: the footer carries the conversations and tokens links there.
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0
    expect(page.locator("footer a[href='/steering/tokens/']")).to_be_visible()
    expect(page.locator("footer a[href='/steering/conversations/']")).to_be_visible()
