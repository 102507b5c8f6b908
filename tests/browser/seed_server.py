"""Prepare a test server's database (browser, crash and scale-out tests): migrated, a user, more lab members,
an API token each, and a completed SmolLM2 training.

Run as `python tests/browser/seed_server.py WORKDIR USERNAME PASSWORD [MEMBER ...]` with the server's
environment: one process does what a migrate, a seed and a create_api_token per member would each start Django
for. Uses the demo SAE (bootstrap_demo) when the repository ships it; otherwise a random SAE at layer 10 written
into WORKDIR, so the panel has real weights to steer with. Prints one JSON line: the training, a feature to
search, and every user's token.
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
    print(
        json.dumps(
            {
                "training": training.pk,
                "feature": feature.index,
                "label": feature.label,
                "search": word,
                "tokens": tokens,
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
