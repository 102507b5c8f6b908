"""Experiments in Django admin: read-only records staff can delete once finished; prompt sets are editable."""

import pytest
from django.urls import reverse

from steering_app import experiments, wake
from steering_app.experiments import ExperimentRequest
from steering_app.models import Experiment, ExperimentResult, PromptSet, SteeringRun
from tests.fake_engine import sweep_outcome, use_engine

pytestmark = pytest.mark.django_db


def request_for(training) -> ExperimentRequest:
    return ExperimentRequest(
        training_id=training.pk,
        conditions=[{"features": [{"feature_id": 3, "coefficient": 2.0}]}],
        intervention_layers=[2],
        strengths=[0, 1],
        prompts=["Plan a picnic", "Describe the sea"],
        max_tokens=8,
        name="picnic weather",
    )


@pytest.fixture
def experiment(owner, training, monkeypatch):
    """A completed experiment: 2 prompts x 2 strengths."""
    use_engine(monkeypatch, sweep_outcome)
    return experiments.create(owner, request_for(training))


@pytest.fixture
def queued_experiment(owner, training, monkeypatch):
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)
    return experiments.create(owner, request_for(training))


def url(name: str, *args) -> str:
    return reverse(f"admin:steering_app_{name}", args=args)


def stored(experiment) -> tuple:
    return tuple(
        Experiment.objects.filter(pk=experiment.pk)
        .values_list("owner_id", "name", "private", "status", "strengths", "prompts")
        .get()
    )


def test_the_changelist_shows_each_experiments_outputs_and_offers_no_add(client, staff, experiment):
    client.force_login(staff)

    response = client.get(url("experiment_changelist"))

    assert response.status_code == 200
    assert '<td class="field-outputs">4 / 4</td>' in response.text
    assert "picnic weather" in response.text and url("experiment_add") not in response.text


def test_the_change_page_is_read_only_and_links_to_the_results(client, staff, experiment):
    client.force_login(staff)

    response = client.get(url("experiment_change", experiment.pk))

    assert response.status_code == 200 and response.context["has_change_permission"] is False
    for name in ("name", "private", "strengths", "prompts", "status"):
        assert f'name="{name}"' not in response.text
    assert 'name="_save"' not in response.text
    assert f"?experiment__id__exact={experiment.pk}" in response.text and "4 outputs" in response.text


def test_a_post_to_the_change_page_changes_nothing(client, staff, teammate, experiment):
    client.force_login(staff)
    before = stored(experiment)

    response = client.post(
        url("experiment_change", experiment.pk),
        {"owner": teammate.pk, "name": "forged", "private": "on", "status": "failed", "_save": "Save"},
    )

    assert response.status_code == 403
    assert stored(experiment) == before


def test_no_experiment_can_be_added_in_admin(client, staff, training):
    client.force_login(staff)

    response = client.post(url("experiment_add"), {"training": training.pk, "name": "new"})

    assert response.status_code == 403
    assert not Experiment.objects.exists()


def test_staff_delete_a_finished_experiment_with_its_runs_and_results(client, staff, experiment):
    client.force_login(staff)

    response = client.post(url("experiment_delete", experiment.pk), {"post": "yes"})

    assert response.status_code == 302
    assert not Experiment.objects.exists()
    assert not SteeringRun.objects.exists() and not ExperimentResult.objects.exists()


def test_an_experiment_still_running_cannot_be_deleted(client, staff, queued_experiment):
    client.force_login(staff)

    single = client.post(url("experiment_delete", queued_experiment.pk), {"post": "yes"})
    selected = client.post(
        url("experiment_changelist"),
        {"action": "delete_selected", "_selected_action": [queued_experiment.pk], "post": "yes"},
    )

    assert (single.status_code, selected.status_code) == (403, 403)
    assert Experiment.objects.filter(pk=queued_experiment.pk).exists()


def test_members_who_are_not_staff_are_kept_out(client, teammate, experiment):
    client.force_login(teammate)

    response = client.post(url("experiment_delete", experiment.pk), {"post": "yes"})

    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    assert Experiment.objects.filter(pk=experiment.pk).exists()


def test_results_are_read_only_and_kept_whole(client, staff, experiment):
    client.force_login(staff)
    result = experiment.results.get(prompt_index=1, strength=1)

    changelist = client.get(url("experimentresult_changelist"), {"experiment__id__exact": experiment.pk})
    change = client.get(url("experimentresult_change", result.pk))
    edit = client.post(url("experimentresult_change", result.pk), {"text": "forged", "score": "1"})
    delete = client.post(url("experimentresult_delete", result.pk), {"post": "yes"})
    add = client.get(url("experimentresult_add"))

    assert changelist.status_code == 200 and len(changelist.context["cl"].result_list) == 4
    assert (
        change.status_code == 200
        and "x1 Describe the sea" in change.text
        and 'name="text"' not in change.text
    )
    assert (edit.status_code, delete.status_code, add.status_code) == (403, 403, 403)
    result.refresh_from_db()
    assert result.text == "x1 Describe the sea" and experiment.results.count() == 4


def prompt_set_form(**changes) -> dict:
    return {"name": "weather", "description": "", "prompts": '["Is it wet?", "Sunny?"]', **changes}


def test_staff_add_and_edit_a_prompt_set(client, staff):
    client.force_login(staff)

    added = client.post(url("promptset_add"), prompt_set_form(prompts='[" Is it wet? ", "Sunny?"]'))
    prompt_set = PromptSet.objects.get()
    edited = client.post(url("promptset_change", prompt_set.pk), prompt_set_form(prompts='["Windy?"]'))

    assert (added.status_code, edited.status_code) == (302, 302)
    prompt_set.refresh_from_db()
    assert prompt_set.prompts == ["Windy?"]


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ('["Same", "Same"]', "repeats prompt 1"),
        ('["ok", ""]', "Prompt 2 is empty"),
        ('["ok", 3]', "Prompt 2 is empty"),
        ('"one string"', "The prompt set is empty"),
        ('{"prompt": "x"}', "The prompt set is empty"),
        ('["nul \\u0000"]', "Prompt 1"),
    ],
)
def test_a_prompt_set_must_hold_distinct_non_empty_prompts(client, staff, prompts, message):
    client.force_login(staff)
    prompt_set = PromptSet.objects.create(name="weather", prompts=["Is it wet?"])

    response = client.post(url("promptset_change", prompt_set.pk), prompt_set_form(prompts=prompts))

    assert response.status_code == 200  # the form again, with the error
    assert [message in error for error in response.context["adminform"].form.errors["prompts"]] == [True]
    prompt_set.refresh_from_db()
    assert prompt_set.prompts == ["Is it wet?"]
