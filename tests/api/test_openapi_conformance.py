"""schemathesis drives every operation of /api/openapi.json: no 500s, every response as documented.

The worker is stubbed (fake_engine), so generate answers in milliseconds without a model.
"""

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

# Random cases of the fuzzing phase per operation. Schemathesis's coverage phase runs first and needs no budget:
# each operation's boundary values, missing and wrong-typed parameters and unexpected methods, run whatever this is.
EXAMPLES_PER_OPERATION = 10

# Loaded at collection (the schema view needs no database); schemathesis.pytest.from_fixture would defer it,
# but it breaks on pytest 9.2 (it sets Node._nodeid, which pytest no longer has).
schema = schemathesis.openapi.from_wsgi("/api/openapi.json", get_wsgi_application())


@pytest.fixture(autouse=True)
def keep_the_test_connection():
    """The raw WSGI app closes the database connection at each request's end (Django's test client turns
    that off); on PostgreSQL that would drop the test's transaction, so turn it off here too."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def owner_headers(owner, bearer, make_run):
    make_run(owner)
    make_run(owner, status="queued", metrics={}, unsteered_output="", steered_output="")
    return bearer(owner)


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_it_conforms_to_its_openapi_schema(case, training, fake_engine, owner_headers):
    # A request valid by the schema may still be a 400 by the data: a layer beyond this model, a feature outside
    # this training, multiplicative steering off the SAE's layer. Every other default check runs.
    case.call_and_validate(headers=owner_headers, excluded_checks=[positive_data_acceptance])
