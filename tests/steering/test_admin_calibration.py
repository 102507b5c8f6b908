import pytest
from django.urls import reverse

from steering_app.models import Calibration

pytestmark = pytest.mark.django_db


@pytest.fixture
def calibration(training):
    return Calibration.objects.create(
        training=training, status=Calibration.Status.FAILED, tokens_target=1000, error="interrupted"
    )


def test_it_lists_calibrations_to_staff(client, staff, calibration):
    client.force_login(staff)

    listed = client.get(reverse("admin:steering_app_calibration_changelist"))
    shown = client.get(reverse("admin:steering_app_calibration_change", args=[calibration.pk]))

    assert listed.status_code == shown.status_code == 200
    assert b"interrupted" in shown.content


def test_it_offers_no_add_form_calibrations_come_from_the_command(client, staff):
    client.force_login(staff)

    response = client.get(reverse("admin:steering_app_calibration_add"))

    assert response.status_code == 403
