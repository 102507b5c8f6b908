"""What the engine takes from a tokenizer: which ids are special (never steered, never counted as text),
which ids end a generation, which id pads a row, and the ids the model reads for a prompt (plain, or as
the user's turn of the chat template)."""

from __future__ import annotations

import functools

import torch

from .steer import SpecError


@functools.cache
def special_ids(tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's special tokens: BOS, EOS, padding, unknown and the chat markers."""
    return frozenset(tokenizer.all_special_ids)


@functools.cache
def special_id_tensor(tokenizer) -> torch.Tensor:
    """special_ids as a sorted CPU tensor, for torch.isin."""
    return torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long)


def eos_token_ids(tokenizer, model: torch.nn.Module) -> set[int]:
    """Every id that ends a generation: the model's generation config may name several (chat models)."""
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def pad_token_id(tokenizer, model: torch.nn.Module) -> int:
    """What a finished row is fed, and what pads a batch: the tokenizer's pad token, else an EOS token."""
    pad = tokenizer.pad_token_id
    return min(eos_token_ids(tokenizer, model), default=0) if pad is None else pad


def chat_text(tokenizer, prompt: str) -> str | None:
    """prompt as the user's turn of the tokenizer's chat template, ready for the assistant's answer; None when
    the tokenizer has no chat template."""
    return chat_history_text(tokenizer, [{"role": "user", "content": prompt}])


def chat_history_text(tokenizer, messages: list[dict]) -> str | None:
    """A conversation ([{"role", "content"}]: system, user, assistant, ...) through the tokenizer's chat template,
    ready for the assistant's next answer; None when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """The ids the model reads for a conversation so far (chat_history_text; the template writes the special
    tokens itself)."""
    text = chat_history_text(tokenizer, messages)
    if text is None:
        raise SpecError("chat", "this model's tokenizer has no chat template")
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_text(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The ids the model reads for a prompt: the tokenizer's own special tokens, or the chat template."""
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt).input_ids)
