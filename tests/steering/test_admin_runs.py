"""Steering runs in Django admin: read-only records that staff can delete, never add or edit."""

import pytest
from django.urls import reverse
from django.utils import timezone

from steering_app.models import SteeringRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def run(owner, training):
    return SteeringRun.objects.create(
        owner=owner,
        training=training,
        prompt="Tell me about rain",
        features=[{"feature_id": 3, "coefficient": 2.0}],
        intervention_layers=[2],
        seed=42,
        status=SteeringRun.Status.COMPLETED,
        unsteered_output="It is dry.",
        steered_output="It pours.",
        metrics={"kl_divergence": 0.5},
        finished_at=timezone.now(),
    )


def change_url(run):
    return reverse("admin:steering_app_steeringrun_change", args=[run.pk])


def stored(run) -> tuple:
    return tuple(
        SteeringRun.objects.filter(pk=run.pk)
        .values_list(
            "owner_id",
            "prompt",
            "features",
            "intervention_layers",
            "seed",
            "private",
            "status",
            "unsteered_output",
            "steered_output",
            "metrics",
        )
        .get()
    )


def test_it_shows_every_field_of_a_run_read_only(client, staff, run):
    client.force_login(staff)

    response = client.get(change_url(run))

    assert response.status_code == 200
    html = response.text
    assert "Tell me about rain" in html and "It pours." in html
    for name in ("prompt", "seed", "features", "unsteered_output", "metrics", "private"):
        assert f'name="{name}"' not in html  # no input for any field
    assert 'name="_save"' not in html and "Delete" in html
    assert response.context["has_change_permission"] is False


def test_it_shows_each_field_once_with_the_steering_fields_in_their_own_section(client, staff, run):
    client.force_login(staff)

    fieldsets = client.get(change_url(run)).context["adminform"].fieldsets

    shown = [name for _title, options in fieldsets for name in options["fields"]]
    # The stored metrics and variants appear as tables in their place, and the run's page is linked.
    tables = {"metrics": "metrics_table", "variants": "variants_table"}
    expected = [
        tables.get(field.name, field.name) for field in SteeringRun._meta.fields if field.name != "id"
    ]
    assert sorted(shown) == sorted(["run_page", *expected])
    assert fieldsets[-1] == (
        "Steering",
        {
            "fields": (
                "features",
                "intervention_layers",
                "method",
                "temperature",
                "max_tokens",
                "chat",
                "sweep",
            )
        },
    )


def test_a_post_to_the_change_page_changes_nothing(client, staff, run, teammate):
    client.force_login(staff)
    before = stored(run)

    response = client.post(
        change_url(run),
        {
            "owner": teammate.pk,
            "prompt": "rewritten",
            "seed": "1",
            "private": "on",
            "steered_output": "forged",
            "metrics": '{"kl_divergence": 0}',
            "_save": "Save",
        },
    )

    assert response.status_code == 403
    assert stored(run) == before


def test_no_run_can_be_added_in_admin(client, staff, run):
    client.force_login(staff)

    changelist = client.get(reverse("admin:steering_app_steeringrun_changelist")).text
    response = client.post(reverse("admin:steering_app_steeringrun_add"), {"prompt": "new", "seed": "1"})

    assert reverse("admin:steering_app_steeringrun_add") not in changelist
    assert response.status_code == 403
    assert SteeringRun.objects.count() == 1


def test_staff_delete_a_finished_run(client, staff, run):
    client.force_login(staff)

    response = client.post(reverse("admin:steering_app_steeringrun_delete", args=[run.pk]), {"post": "yes"})

    assert response.status_code == 302
    assert not SteeringRun.objects.filter(pk=run.pk).exists()


def test_staff_delete_selected_finished_runs(client, staff, run, owner, training):
    other = SteeringRun.objects.create(
        owner=owner,
        training=training,
        prompt="x",
        seed=1,
        status="failed",
        features=[],
        intervention_layers=[2],
    )
    client.force_login(staff)

    response = client.post(
        reverse("admin:steering_app_steeringrun_changelist"),
        {"action": "delete_selected", "_selected_action": [run.pk, other.pk], "post": "yes"},
    )

    assert response.status_code == 302
    assert not SteeringRun.objects.exists()


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_run_still_being_generated_cannot_be_deleted(client, staff, run, status):
    SteeringRun.objects.filter(pk=run.pk).update(status=status, finished_at=None)
    client.force_login(staff)

    single = client.post(reverse("admin:steering_app_steeringrun_delete", args=[run.pk]), {"post": "yes"})
    selected = client.post(
        reverse("admin:steering_app_steeringrun_changelist"),
        {"action": "delete_selected", "_selected_action": [run.pk], "post": "yes"},
    )

    assert (single.status_code, selected.status_code) == (403, 403)
    assert SteeringRun.objects.filter(pk=run.pk).exists()


def test_members_who_are_not_staff_cannot_delete_in_admin(client, teammate, run):
    client.force_login(teammate)

    response = client.post(reverse("admin:steering_app_steeringrun_delete", args=[run.pk]), {"post": "yes"})

    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    assert SteeringRun.objects.filter(pk=run.pk).exists()


def test_it_shows_metrics_and_variants_as_tables_and_links_the_runs_page(client, staff, run):
    SteeringRun.objects.filter(pk=run.pk).update(
        metrics={"kl_divergence": 0.123456, "feature_activation": [{"feature_id": 3, "steered": 3.5}]},
        variants=[
            {
                "multiplier": 1.0,
                "steered_output": "It pours.",
                "tokens": 3,
                "metrics": {"kl_divergence": 0.5},
            },
            {
                "multiplier": 2.0,
                "steered_output": "Rain <b>rain</b>",
                "tokens": 4,
                "metrics": {"kl_divergence": 1.25},
                "scores": {"score": 0.375},
            },
        ],
    )
    client.force_login(staff)

    html = client.get(change_url(run)).text

    assert f'<a href="/steering/runs/{run.pk}/">' in html
    assert '<table class="run-metrics"><tr><th>kl_divergence</th><td>0.1235</td></tr>' in html
    assert "<td>feature_id: 3, steered: 3.5</td>" in html
    assert (
        "<tr><th>multiplier</th><th>tokens</th><th>kl_divergence</th><th>score</th><th>text</th></tr>" in html
    )
    assert (
        "<tr><td>2</td><td>4</td><td>1.25</td><td>0.375</td><td>Rain &lt;b&gt;rain&lt;/b&gt;</td></tr>"
        in html
    )
    assert "&quot;kl_divergence&quot;" not in html  # no raw JSON
