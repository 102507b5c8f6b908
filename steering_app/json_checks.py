"""JSON from outside, refused before it can hurt: an API body, a presets document, an SAE's cfg.json or
hyperparams.json, a labels file.

json.loads recurses once per nested array or object, so a small document of 100,000 brackets raises
RecursionError; the depth is measured on the raw bytes first. Python's json accepts "\\ud800" (a lone UTF-16
surrogate, not a character) and NUL: SQLite's UTF-8 encoder raises on the first and PostgreSQL refuses the
second, both as 500s, so every string (and key) of the parsed document is checked once, here. It also accepts
NaN, ±Infinity and integers no float can hold (1 followed by 400 zeros): text, number, whole_number and
text_list check the values a caller keeps, each naming the path of the value at fault.

Plain Python, no Django and no torch: the engine reads checkpoints with it, and the API parses every body.
"""

import json
import math
import re
import sys
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


class MalformedJSON(ValueError):
    """Parsed (or parseable) JSON the application refuses; `path` leads to the offending value."""

    def __init__(self, message: str, path: tuple = ()):
        super().__init__(f"{bracketed(path)}: {message}" if path else message)
        self.message = message
        self.path = path


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects, counting brackets outside strings only."""
    brackets = STRING.sub(b"", raw).translate(None, NOT_BRACKETS)
    return max(accumulate(array("b", brackets.translate(STEPS))), default=0)


def check_depth(raw: bytes) -> None:
    if nesting_depth(raw) > MAX_DEPTH:
        raise MalformedJSON(f"The JSON is nested more than {MAX_DEPTH} levels deep.")


def loads(raw: bytes | str) -> object:
    """json.loads, after refusing a document nested deeper than MAX_DEPTH; its strings are then checked."""
    check_depth(raw if isinstance(raw, bytes) else raw.encode())
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


def finite_float(value: object) -> float | None:
    """A JSON number as a float; None for anything else: true and false (ints to Python), NaN, ±Infinity,
    and integers beyond float's range, whose float() raises OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def digits_as_int(value: object) -> object:
    """A string of decimal digits as its int (Neuronpedia writes indices as "12"); any other value as given.
    int() refuses a string of more than sys.get_int_max_str_digits() digits: that one stays a string too."""
    if isinstance(value, str) and value.strip().isdecimal() and len(value) <= sys.get_int_max_str_digits():
        return int(value)
    return value


def text(value: object, path: tuple) -> str:
    if not isinstance(value, str):
        raise MalformedJSON(f"must be text, got {_shown(value)}", path)
    return value


def number(value: object, path: tuple, minimum: float = -math.inf, maximum: float = math.inf) -> float:
    checked = finite_float(value)
    if checked is None or not minimum <= checked <= maximum:
        bounds = "" if (minimum, maximum) == (-math.inf, math.inf) else f" from {minimum:g} to {maximum:g}"
        raise MalformedJSON(f"must be a finite number{bounds}, got {_shown(value)}", path)
    return checked


def whole_number(value: object, path: tuple, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise MalformedJSON(f"must be a whole number from {minimum} to {maximum}, got {_shown(value)}", path)
    return value


def text_list(value: object, path: tuple) -> list[str]:
    if not isinstance(value, list):
        raise MalformedJSON(f"must be a list of text, got {_shown(value)}", path)
    return [text(item, (*path, position)) for position, item in enumerate(value)]


def _shown(value: object) -> str:
    """The value as JSON spells it (Infinity, "abc"), cut short: a refused value may be huge."""
    spelled = json.dumps(value)
    return spelled if len(spelled) <= 40 else spelled[:40] + "…"
