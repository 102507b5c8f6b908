"""Prepare a test server's database (browser, crash and scale-out tests): migrated, a user, more lab members,
an API token each, and a completed SmolLM2 training.

Run as `python tests/browser/seed_server.py WORKDIR USERNAME PASSWORD [MEMBER ...]` with the server's
environment: one process does what a migrate, a seed and a create_api_token per member would each start Django
for. Uses the demo SAE (bootstrap_demo) when the repository ships it; otherwise a random SAE at layer 10 written
into WORKDIR, so the panel has real weights to steer with. Prints one JSON line: the training, a feature to
search, and every user's token.

With STEERLAB_SEED_LOADING_MODEL=DIR in its environment (the browser tests' server) it adds a tiny random Llama
for tests/browser/test_model_loading.py, written into DIR, whose training it leaves pending (see loading_model).
"""

import json
import os
import sys
from pathlib import Path

import django

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "steerproject.settings")
django.setup()

from django.contrib.auth import get_user_model
from django.core.management import call_command

from steering_app.engine.demo import DEMO_CHECKPOINT, DEMO_LAYER, DEMO_MODEL, DEMO_MODEL_NAME
from steering_app.models import ApiToken, Feature, Training

RANDOM_LABELS = [
    {
        "index": 5,
        "label": "weather and rain",
        "description": "rain, storms, forecasts",
        "max_activation": 6.0,
    },
    {
        "index": 9,
        "label": "cooking recipes",
        "description": "ingredients and kitchens",
        "max_activation": 4.5,
    },
    {"index": 17, "label": "python code", "description": "def, import, self", "max_activation": 5.0},
]


def random_training(workdir: Path) -> None:
    import torch

    from steering_app.engine.saes.sae import save_sae
    from steering_app.engine.training import hook_name_for

    generator = torch.Generator().manual_seed(0)
    d_in, d_sae = 576, 64
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    path = save_sae(
        workdir / "random-sae",
        W_enc=W_dec.T.contiguous(),
        W_dec=W_dec,
        b_enc=torch.zeros(d_sae),
        b_dec=torch.zeros(d_in),
        cfg={
            "architecture": "standard",
            "metadata": {"model_name": DEMO_MODEL_NAME, "hook_name": hook_name_for(DEMO_LAYER)},
        },
    )
    labels = workdir / "labels.json"
    labels.write_text(json.dumps(RANDOM_LABELS))
    call_command("register_model", DEMO_MODEL_NAME, DEMO_MODEL)
    call_command(
        "import_sae",
        "--model",
        DEMO_MODEL_NAME,
        "--path",
        str(path),
        "--labels",
        str(labels),
        "--dataset",
        "random-test-sae",
    )


LOADING_MODEL = "tiny-loading-llama"


def loading_model(root: Path) -> dict:
    """A tiny random Llama (SmolLM2's tokenizer) and a random SAE at its layer 1, registered and imported, its
    training left pending: a worker loads the models of completed trainings as it starts, so this one stays
    unloaded until test_model_loading completes its training in the running server's database, and that test's
    first run must load it. Made here, where torch is imported already, instead of in a process of its own."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steering_app.engine import loader
    from steering_app.engine.saes.sae import save_sae
    from steering_app.engine.training import hook_name_for

    tokenizer = loader.load_tokenizer(DEMO_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    W_dec = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    sae = save_sae(
        root / "sae",
        W_enc=W_dec.T.contiguous(),
        W_dec=W_dec,
        b_enc=torch.zeros(8),
        b_dec=torch.zeros(16),
        cfg={
            "architecture": "standard",
            "metadata": {"model_name": LOADING_MODEL, "hook_name": hook_name_for(1)},
        },
    )
    call_command("register_model", LOADING_MODEL, str(root / "model"), stdout=sys.stderr)
    call_command(
        "import_sae",
        "--model",
        LOADING_MODEL,
        "--path",
        str(sae),
        "--dataset",
        "tiny-loading-corpus",
        stdout=sys.stderr,
    )
    training = Training.objects.get(model__name=LOADING_MODEL)
    Training.objects.filter(pk=training.pk).update(status=Training.Status.PENDING)
    return {"name": LOADING_MODEL, "training": training.pk}


def main(workdir: Path, username: str, password: str, members: list[str]) -> None:
    call_command("migrate", "--noinput", verbosity=0)
    if (DEMO_CHECKPOINT / "cfg.json").is_file():
        call_command("bootstrap_demo")
    else:
        random_training(workdir)
    users = [get_user_model().objects.create_user(username, password=password)]
    users += [get_user_model().objects.create_user(member) for member in members]
    tokens = {user.username: ApiToken.issue(user, "tests")[1] for user in users}
    training = Training.objects.filter(status=Training.Status.COMPLETED).first()
    feature = (
        Feature.objects.filter(training=training)
        .exclude(label="")
        .exclude(label__startswith="feature #")
        .order_by("index")
        .first()
    )
    word = max(feature.label.split(), key=len)
    seeded = {
        "training": training.pk,
        "feature": feature.index,
        "label": feature.label,
        "search": word,
        "tokens": tokens,
    }
    vector_space = Training.objects.filter(encoder_type=Training.EncoderType.VECTORS).first()
    if vector_space is not None:
        seeded["vector_space"] = vector_space.pk
    if os.environ.get("STEERLAB_SEED_LOADING_MODEL"):
        seeded["loading_model"] = loading_model(Path(os.environ["STEERLAB_SEED_LOADING_MODEL"]))
    print(json.dumps(seeded))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
