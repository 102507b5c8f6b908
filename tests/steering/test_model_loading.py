"""model_loading: a model's first batch says how its load goes, to the pages of the runs that wait for it."""

import pytest

from steering_app import model_loading, services, streaming
from steering_app.engine import loader
from steering_app.model_files import DEMO_MODEL
from tests.engine.conftest import tiny_lm

pytestmark = pytest.mark.django_db


def test_a_models_first_batch_reports_its_step_plan_then_ready_and_later_batches_nothing(
    make_run, owner, monkeypatch
):
    lm = tiny_lm("llama", loader.load_tokenizer(DEMO_MODEL))
    monkeypatch.setattr(loader, "load_model", lambda source, **options: lm)  # weights already loaded
    published = []
    monkeypatch.setattr(streaming, "publish_loading", lambda *report: published.append(report[:4]))
    run = make_run(owner)
    model = run.training.model

    services.EngineBatch(run)
    first = list(dict.fromkeys(published))  # the repeater may have said a stage again meanwhile
    services.EngineBatch(run)

    assert first == [
        (
            model.pk,
            model.name,
            int(100 * model_loading.PLAN_START),
            "measuring this machine's kernels",
        ),
        (model.pk, model.name, 100, "ready"),
    ]
    assert list(dict.fromkeys(published)) == first
