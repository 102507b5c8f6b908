"""Preset fixtures. Users, the 32-feature training and make_preset come from tests/conftest.py."""

import pytest
from django.test.signals import template_rendered
from template_partials.templatetags.partials import TemplateProxy

from steering_app.models import Training


@pytest.fixture(autouse=True)
def partials_report_their_context(monkeypatch):
    """django-template-partials renders "page.html#part" past the test client's instrumentation: without this,
    response.context is None for every HTMX partial."""
    render = TemplateProxy._render

    def instrumented(self, context):
        template_rendered.send(sender=self, template=self, context=context)
        return render(self, context)

    monkeypatch.setattr(TemplateProxy, "_render", instrumented)


@pytest.fixture
def preset(make_preset):
    return make_preset(name="rainy python", description="rain and code")


@pytest.fixture
def pending_training(language_model):
    return Training.objects.create(
        model=language_model,
        encoder_type=Training.EncoderType.STANDARD,
        hook_layer=1,
        hook_name="blocks.1.hook_resid_post",
        d_in=16,
        d_sae=32,
        checkpoint_path="/nonexistent/sae2",
        status=Training.Status.RUNNING,
    )


@pytest.fixture
def login(client):
    """login(user) -> the test client, logged in as the user."""

    def log_in(user):
        client.force_login(user)
        return client

    return log_in
