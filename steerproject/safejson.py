"""The API's body parser: JSON media types only, read through json_checks.loads (nesting depth bounded before
parsing; NUL and lone surrogates refused after)."""

from ninja.parser import Parser

from steering_app.json_checks import MalformedJSON, loads


def is_json_media_type(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


class SafeJSONParser(Parser):
    """ninja's body parser: only JSON media types, through `loads`."""

    def parse_body(self, request):
        if not is_json_media_type(request.content_type or ""):
            raise MalformedJSON(
                f"Send the body as application/json, not {request.content_type or 'without a content type'}."
            )
        return loads(request.body)
