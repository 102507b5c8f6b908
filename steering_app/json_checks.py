"""JSON from outside, refused before it can hurt: an API body, a presets document.

json.loads recurses once per nested array or object, so a small document of 100,000 brackets raises
RecursionError; the depth is measured on the raw bytes first. Python's json accepts "\\ud800" (a lone UTF-16
surrogate, not a character) and NUL: SQLite's UTF-8 encoder raises on the first and PostgreSQL refuses the
second, both as 500s, so every string (and key) of the parsed document is checked once, here.

Plain Python, no Django and no torch: importing it costs the web process nothing.
"""

import json
import re
from array import array
from itertools import accumulate

MAX_DEPTH = 64
# A JSON string, escapes included; the unrolled form keeps the regex linear on long strings.
STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
BRACKETS = b"[]{}"
NOT_BRACKETS = bytes(b for b in range(256) if b not in BRACKETS)
# Opening brackets step +1 and closing ones -1 once read as signed bytes.
STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class MalformedJSON(Exception):
    """Parsed (or parseable) JSON the application refuses; `path` leads to the offending value."""

    def __init__(self, message: str, path: tuple = ()):
        super().__init__(message)
        self.message = message
        self.path = path


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects, counting brackets outside strings only."""
    brackets = STRING.sub(b"", raw).translate(None, NOT_BRACKETS)
    return max(accumulate(array("b", brackets.translate(STEPS))), default=0)


def loads(raw: bytes) -> object:
    """json.loads, after refusing a document nested deeper than MAX_DEPTH; its strings are then checked."""
    if nesting_depth(raw) > MAX_DEPTH:
        raise MalformedJSON(f"The JSON is nested more than {MAX_DEPTH} levels deep.")
    document = json.loads(raw)
    check_strings(document)
    return document


def check_strings(value: object, path: tuple = ()) -> None:
    """Raise MalformedJSON at the first string or key holding NUL or a lone surrogate."""
    if isinstance(value, str):
        if UNSTORABLE.search(value):
            raise MalformedJSON(
                "Text must not contain NUL characters or lone surrogates (U+D800 to U+DFFF).", path
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(key, path)
            check_strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_strings(item, (*path, index))


def bracketed(path: tuple) -> str | None:
    """('presets', 0, 'name') -> 'presets[0].name', as the presets import names fields."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".") or None
