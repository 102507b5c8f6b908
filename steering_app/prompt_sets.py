"""Prompt sets from what members paste or upload: plain lines or JSON Lines, checked before anything is stored.

The API and the web form both read prompts with prompts_from_text / prompts_from_jsonl and store them with
create_prompt_set, so both refuse the same sets; admin checks an edited set with checked_prompts.
"""

from pathlib import Path

from django.db import IntegrityError, transaction

from steering_app import experiments, json_checks, json_lines
from steering_app.errors import InvalidInput
from steering_app.models import PromptSet

MAX_PROMPTS = 1000
MAX_NAME_CHARS = PromptSet._meta.get_field("name").max_length
# An upload holding MAX_PROMPTS prompts of a few thousand characters each; read whole into memory.
MAX_UPLOAD_BYTES = 16 * 1024 * 1024


def prompts_from_text(text: str) -> list[str]:
    """One prompt per line; blank lines are skipped (a trailing newline is not an empty prompt)."""
    return [line for line in text.splitlines() if line.strip()]


def prompts_from_jsonl(text: str, field_name: str = "file") -> list[str]:
    """One prompt per non-blank line: a JSON string, or an object whose "prompt" is one.
    InvalidInput naming the line (counted from 1, blank ones included) otherwise."""
    prompts = []
    for number, value in json_lines.read(text, field_name):
        prompt = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(prompt, str):
            raise InvalidInput(
                f'Line {number} must be a JSON string or an object with a "prompt" string.', field_name
            )
        prompts.append(prompt)
    return prompts


def checked_prompts(prompts: object, field_name: str = "prompts") -> list[str]:
    """At most MAX_PROMPTS distinct, non-empty prompts, stripped, that every database can store."""
    if isinstance(prompts, list | tuple) and len(prompts) > MAX_PROMPTS:
        raise InvalidInput(
            f"A prompt set holds at most {MAX_PROMPTS} prompts, not {len(prompts)}.", field_name
        )
    cleaned = experiments.clean_prompts(prompts, field_name)
    for number, prompt in enumerate(cleaned, start=1):
        _check_storable(prompt, field_name, f"Prompt {number}")
    return cleaned


def prompts_from_file(filename: str, data: bytes, field_name: str = "file") -> list[str]:
    """The prompts of an uploaded .txt (prompts_from_text) or .jsonl (prompts_from_jsonl), UTF-8."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidInput(f"The file is larger than {MAX_UPLOAD_BYTES // 1024 // 1024} MB.", field_name)
    suffix = Path(filename).suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise InvalidInput(
            "Upload a .txt file (one prompt per line) or a .jsonl file (one JSON prompt per line).",
            field_name,
        )
    try:
        text = data.decode("utf-8-sig")  # a byte order mark is not part of the first prompt
    except UnicodeDecodeError as error:
        raise InvalidInput(
            f"The file is not UTF-8 text ({error.reason} at byte {error.start}).", field_name
        ) from error
    return prompts_from_text(text) if suffix == ".txt" else prompts_from_jsonl(text, field_name)


def create_prompt_set(
    owner, name: str, description: str, prompts: object, prompts_field: str = "prompts"
) -> PromptSet:
    """Store a new set; InvalidInput naming `name`, `description` or `prompts_field` (where the prompts came
    from: a list, pasted text, a file), and nothing stored, otherwise."""
    name, description = str(name or "").strip(), str(description or "")
    if not name:
        raise InvalidInput("Give the prompt set a name.", "name")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"The name is longer than {MAX_NAME_CHARS} characters.", "name")
    _check_storable(name, "name", "The name")
    _check_storable(description, "description", "The description")
    cleaned = checked_prompts(prompts, prompts_field)
    try:
        with transaction.atomic():
            return PromptSet.objects.create(owner=owner, name=name, description=description, prompts=cleaned)
    except IntegrityError as error:  # the name's unique constraint, checked by the database against races
        raise InvalidInput(f'A prompt set named "{name}" already exists.', "name") from error


def _check_storable(text: str, field_name: str, label: str) -> None:
    """PostgreSQL refuses NUL and SQLite a lone surrogate: a 400 here rather than a 500 when stored."""
    try:
        json_checks.check_strings(text)
    except json_checks.MalformedJSON as error:
        raise InvalidInput(f"{label}: {error.message}", field_name) from error
