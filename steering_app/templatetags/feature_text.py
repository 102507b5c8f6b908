"""Template filters for the text a feature table records: snippets with their token marked, frequencies."""

import math
import re

from django import template

register = template.Library()

# Feature.examples mark the strongest token «like this» (describe_features, Neuronpedia imports).
_MARKED = re.compile(r"^(.*?)«(.*?)»(.*)$", re.DOTALL)


@register.filter
def marked(snippet: str) -> tuple[str, str, str]:
    """(before, the marked token, after) of a snippet; the whole snippet before when nothing is marked."""
    match = _MARKED.match(str(snippet))
    return match.groups() if match else (str(snippet), "", "")


@register.filter
def percent(fraction) -> str:
    """0.006 -> "0.60%"; two significant decimals down to 0.01%, then "<0.01%"; "–" when unknown."""
    if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not math.isfinite(fraction):
        return "–"
    value = fraction * 100
    if 0 < value < 0.01:
        return "<0.01%"
    return f"{value:.2f}%"
