"""The Content-Security-Policy in a real browser: the panel, the admin and /api/docs run with no violation.

Every page records `securitypolicyviolation` events (an init script) and the console's CSP reports; the panel
must still work under the policy: search a feature and add it, save a preset with Enter (a listener that
used to be an inline hx-on handler), open a same-origin websocket.
"""

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

from tests import processes
from tests.browser.conftest import server_environment
from tests.browser.test_steering_panel import log_in

pytestmark = pytest.mark.browser

RECORD_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__csp.push(`${event.violatedDirective} blocked ${event.blockedURI || "inline"} at ${event.sourceFile}:${event.lineNumber}`);
});
"""

OPEN_WEBSOCKET = """
(url) => new Promise((resolve) => {
  let socket;
  try { socket = new WebSocket(url); } catch (error) { resolve("threw " + error.name); return; }
  socket.onopen = () => { socket.close(); resolve("open"); };
  socket.onerror = () => resolve("error");
  socket.onclose = () => resolve("closed");
})
"""


@pytest.fixture
def watched(page):
    """The page, recording CSP violations; watched.violations() lists them (page events and console)."""
    console = []
    page.add_init_script(RECORD_VIOLATIONS)
    page.on(
        "console",
        lambda message: console.append(message.text) if "Content Security Policy" in message.text else None,
    )

    def violations() -> list[str]:
        return page.evaluate("window.__csp || []") + console

    page.violations = violations
    return page


def make_staff(server, username: str, password: str) -> None:
    env = server_environment(server.log.parent)
    code = (
        "from django.contrib.auth import get_user_model; "
        f"get_user_model().objects.create_superuser({username!r}, password={password!r})"
    )
    processes.manage(env, "shell", "-c", code)


def test_the_panel_works_under_the_policy(watched, server):
    page = watched
    log_in(page, server)
    assert page.violations() == []

    page.fill("#feature-search", server.seed["search"])
    result = page.locator(f'#feature-results .feature-result[data-feature-id="{server.seed["feature"]}"]')
    result.wait_for()
    result.locator(".btn-add").click()
    page.locator(f'#selected-features .feature-card[data-feature-id="{server.seed["feature"]}"]').wait_for()
    expect(page.locator("#feature-count")).to_have_text("1")

    page.locator("#presets-body input[name=preset_name]").wait_for()
    page.fill("input[name=preset_name]", "csp preset")
    page.press("input[name=preset_name]", "Enter")
    page.locator("#presets-body li.preset", has_text="csp preset").wait_for()
    assert page.violations() == []

    ws_url = server.url.replace("http://", "ws://") + "/ws/steering/runs/999999/"
    outcome = page.evaluate(OPEN_WEBSOCKET, ws_url)
    # The consumer refuses a run that does not exist; a CSP refusal would be a violation (or a SecurityError).
    assert outcome in ("open", "closed", "error"), outcome
    page.wait_for_timeout(500)  # a violation event is dispatched asynchronously
    assert page.violations() == []

    page.goto(f"{server.url}/steering/runs/")
    assert page.violations() == []


def test_the_admin_and_the_api_docs_work_under_the_policy(watched, server):
    page = watched
    make_staff(server, "csp-admin", "pw-csp-admin-1")
    page.goto(f"{server.url}/admin/login/")
    page.fill("#id_username", "csp-admin")
    page.fill("#id_password", "pw-csp-admin-1")
    page.click("input[type=submit]")
    page.wait_for_url(f"{server.url}/admin/")

    for path in (
        "/admin/",
        "/admin/presets_app/steeringpreset/",
        "/admin/presets_app/steeringpreset/add/",
        "/admin/auth/user/",
        "/admin/steering_app/training/",
    ):
        response = page.goto(f"{server.url}{path}")
        assert response.status == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"], path
        page.wait_for_load_state("networkidle")
        assert page.violations() == [], path

    page.goto(f"{server.url}/api/docs")
    page.locator(".swagger-ui .opblock").first.wait_for()
    assert page.violations() == []
