"""The JSON API at /api/ (docs at /api/docs): every router's errors leave here as one shape, {"detail", "field"}."""

import logging

from django.core.exceptions import PermissionDenied, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from django.http.multipartparser import MultiPartParserError
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from steering_app.auth import api_auth
from steering_app.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    SteeringError,
    TooManyRuns,
    WorkerUnavailable,
)
from steering_app.json_checks import MalformedJSON
from steerproject.safejson import SafeJSONParser

logger = logging.getLogger(__name__)

api = NinjaAPI(
    title="SteerLab API",
    version="1.0",
    urls_namespace="api",
    auth=api_auth,
    parser=SafeJSONParser(),
    description="Log in (session cookie + X-CSRFToken header) or send `Authorization: Bearer <token>` "
    "(`manage.py create_api_token USERNAME`). Every error body is `{detail, field}`.",
)


def error(request, status: int, detail: str, field: str | None = None):
    return api.create_response(request, {"detail": detail, "field": field}, status=status)


def dotted(location: tuple) -> str | None:
    """('body', 'payload', 'features', 0, 'coefficient') -> 'features.0.coefficient'; ('query', 'limit') -> 'limit'."""
    source, *path = location
    if source == "body":
        path = path[1:]  # the view's body parameter name means nothing to the client
    return ".".join(str(part) for part in path) or None


def not_found(request, unmatched: str = ""):
    """Every path under /api/ that no route matches (mounted after the API in urls.py): JSON, not HTML."""
    return error(request, 404, f"No API endpoint at {request.path}.")


@api.exception_handler(ValidationError)
def on_validation_error(request, exc: ValidationError):
    # ninja answers 422; the API promises 400 for every invalid input, type errors included.
    fields = [dotted(tuple(item.get("loc", ("body",)))) for item in exc.errors]
    messages = [
        f"{field}: {item['msg']}" if field else item["msg"] for field, item in zip(fields, exc.errors)
    ]
    return error(request, 400, "; ".join(messages) or "Invalid request.", fields[0] if fields else None)


# The one mapping of domain errors to HTTP status codes.
STATUS_CODES: dict[type[SteeringError], int] = {
    InvalidInput: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooManyRuns: 429,
    WorkerUnavailable: 503,
}


def status_code(exc: SteeringError) -> int:
    return next((code for kind, code in STATUS_CODES.items() if isinstance(exc, kind)), 400)


@api.exception_handler(SteeringError)
def on_steering_error(request, exc: SteeringError):
    response = error(request, status_code(exc), exc.message, exc.field)
    if isinstance(exc, TooManyRuns):
        response["Retry-After"] = str(exc.retry_after)
    return response


@api.exception_handler(DjangoValidationError)
def on_model_validation_error(request, exc: DjangoValidationError):
    if hasattr(exc, "error_dict"):
        field, errors = next(iter(exc.error_dict.items()))
        return error(request, 400, " ".join(message for e in errors for message in e.messages), field)
    return error(request, 400, " ".join(exc.messages))


@api.exception_handler(AuthenticationError)
def on_authentication_error(request, exc: AuthenticationError):
    detail = (
        exc.message
        if exc.message != "Unauthorized"
        else ("Authentication required: log in, or send the header Authorization: Bearer <token>.")
    )
    return error(request, 401, detail)


@api.exception_handler(HttpError)
def on_http_error(request, exc: HttpError):
    if isinstance(exc.__cause__, MalformedJSON):  # ninja wraps every body parser error in a bare HttpError
        return error(request, 400, exc.__cause__.message, dotted(("body", None, *exc.__cause__.path)))
    return error(request, exc.status_code, exc.message)


@api.exception_handler(Http404)
def on_not_found(request, exc: Http404):
    return error(request, 404, str(exc) or "Not found.")


@api.exception_handler(PermissionDenied)
def on_permission_denied(request, exc: PermissionDenied):
    return error(request, 403, str(exc) or "Permission denied.")


@api.exception_handler(MultiPartParserError)
@api.exception_handler(SuspiciousOperation)
def on_malformed_request(request, exc: Exception):
    # A broken multipart body or one over Django's size limits: the client's fault, not a 500.
    return error(request, 400, f"Malformed request: {exc}")


@api.exception_handler(Exception)
def on_unexpected_error(request, exc: Exception):
    logger.exception("Unhandled API error on %s %s", request.method, request.path)
    return error(request, 500, "Internal server error.")


api.add_router("/", "steering_app.api.router")
api.add_router("/presets/steering", "presets_app.api.router")
