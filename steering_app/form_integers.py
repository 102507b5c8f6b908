"""Whole numbers typed into HTML forms, bounded by what the database's integer columns can hold.

A larger number reaches SQLite as OverflowError (PostgreSQL: NumericValueOutOfRange) in the first query
that uses it, a 500; refused here it is a form error like any other bad value.
"""

from steering_app.limits import MAX_ID


def storable_int(raw: str, maximum: int = MAX_ID) -> int:
    """int(raw), or ValueError when it is not a whole number within -maximum - 1 .. maximum."""
    value = int(raw)
    if not -maximum - 1 <= value <= maximum:
        raise ValueError(f"{raw} is outside -{maximum + 1} .. {maximum}")
    return value
