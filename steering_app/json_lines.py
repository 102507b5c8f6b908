"""JSON Lines from members' uploads (prompt sets, a steering vector's pairs): each line read with json_checks, and a
line it refuses named in an InvalidInput. Not in json_checks itself, which the engine imports: the engine knows
nothing of the domain's errors."""

import json
from collections.abc import Iterator

from steering_app import json_checks
from steering_app.errors import InvalidInput


def read(text: str, field: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of JSON Lines, numbered from 1 with blank lines counted;
    InvalidInput naming `field` and the line when one is not JSON that json_checks accepts."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json_checks.loads(line)
        except json.JSONDecodeError as error:
            # Its own "line 1" would mislead: the document is one line of the file.
            message = f"Line {number} is not valid JSON: {error.msg} at column {error.colno}."
            raise InvalidInput(message, field) from error
        except json_checks.MalformedJSON as error:
            raise InvalidInput(f"Line {number}: {error}", field) from error
        yield number, value
