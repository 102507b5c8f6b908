"""A first run shows its model's load in a real browser (issue 23): a run that waits for a model still loading
sees "loading <model> … N %" on its status line, then generates.

The loading is a tiny random Llama's (with SmolLM2's tokenizer and a random SAE), registered in the session
server after it started, so no worker has loaded it: its first run loads it, in a second or two, and its page
must show that load's progress. SmolLM2 itself is not loaded again for this.
"""

import json

import pytest

from tests import processes
from tests.browser.conftest import server_environment
from tests.browser.test_steering_panel import log_in, wait_for_result

try:
    from playwright.sync_api import expect
except ImportError:  # the chromium_path fixture skips these tests (or fails them under REQUIRE_BROWSER=1)
    expect = None

pytestmark = pytest.mark.browser

MODEL = "tiny-loading-llama"
RUN_SECONDS = 180  # the tiny model's load and step plan on a busy CPU (the server may still warm SmolLM2)

# Run with `manage.py shell -c` in the server's environment: the tiny model and its SAE, registered and imported.
SETUP = """
import json
from pathlib import Path
import torch
from django.core.management import call_command
from transformers import LlamaConfig, LlamaForCausalLM
from steering_app.engine import loader
from steering_app.engine.saes.sae import save_sae
from steering_app.engine.training import hook_name_for
from steering_app.models import Training

root = Path({root!r})
tokenizer = loader.load_tokenizer(loader.SMOLLM2_DEMO)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
LlamaForCausalLM(config).save_pretrained(root / "model")
tokenizer.save_pretrained(root / "model")
W_dec = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
sae = save_sae(root / "sae", W_enc=W_dec.T.contiguous(), W_dec=W_dec, b_enc=torch.zeros(8), b_dec=torch.zeros(16),
    cfg={{"architecture": "standard", "metadata": {{"model_name": {model!r}, "hook_name": hook_name_for(1)}}}})
call_command("register_model", {model!r}, str(root / "model"))
call_command("import_sae", "--model", {model!r}, "--path", str(sae), "--dataset", "tiny-loading-corpus")
print(json.dumps({{"training": Training.objects.get(model__name={model!r}).pk}}))
"""

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
def tiny_training(server, tmp_path_factory) -> int:
    root = tmp_path_factory.mktemp("tiny-loading")
    code = SETUP.format(root=str(root), model=MODEL)
    output = processes.manage(server_environment(server.log.parent), "shell", "-c", code)
    return json.loads(output.strip().splitlines()[-1])["training"]


def test_a_first_run_shows_its_models_loading_progress(page, server, tiny_training):
    log_in(page, server)
    page.goto(
        f"{server.url}/steering/?training={tiny_training}&prompt=Hello&feature_id=0&coefficient=1"
        "&layers=1&max_tokens=2&temperature=0&seed=1"
    )
    expect(page.locator("#generate-button")).to_be_enabled()
    page.evaluate(WATCH_STATUS)

    page.click("#generate-button")
    wait_for_result(page, RUN_SECONDS)

    seen = page.evaluate("window.statusTexts")
    loading = [text for text in seen if text.startswith(f"loading {MODEL} … ")]
    assert loading, f"no loading line among the statuses shown: {seen}\n{server.log_tail()}"
    percents = [int(text.split(" … ")[1].split(" %")[0]) for text in loading]
    assert percents == sorted(percents) and 0 <= percents[0] < 100, loading
    assert seen[-1] == "Completed", seen
