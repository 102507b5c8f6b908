"""Feature descriptions: what each latent of a trained SAE responds to, in words.

describe_features gives each latent its max activation, activation frequency, top tokens with short
contexts and a label made from the words at its strongest activations.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..tokens import special_ids
from .activations import Activations
from .stop import StopCheck, check_stop

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..saes.sae import SAE

_WORD = re.compile(r"[^\W_]", re.UNICODE)


def _is_wordy(text: str) -> bool:
    return bool(_WORD.search(text))


class _Decoder:
    """Token id -> text, cached (decoding one id at a time is slow)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Special tokens only appear in contexts, as document boundaries.
        self.cache: dict[int, str] = {token_id: " | " for token_id in special_ids(tokenizer)}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


def _word_at(row: list[int], pos: int, decode: _Decoder, reach: int = 4) -> str:
    """The whole word the token at pos belongs to (tokens are often word pieces)."""
    token = decode(row[pos])
    if not _is_wordy(token):
        return token.strip()
    start = pos
    while start > pos - reach and start > 0:
        current = decode(row[start])
        previous = decode(row[start - 1])
        if current[:1].isspace() or not current[:1].isalnum() or not previous[-1:].isalnum():
            break
        start -= 1
    end = pos
    while end < pos + reach and end + 1 < len(row):
        following = decode(row[end + 1])
        if not following[:1].isalnum() or not decode(row[end])[-1:].isalnum():
            break
        end += 1
    return "".join(decode(t) for t in row[start : end + 1]).strip()


def _context(row: list[int], pos: int, decode: _Decoder, before: int, after: int) -> str:
    left = "".join(decode(t) for t in row[max(0, pos - before) : pos])
    right = "".join(decode(t) for t in row[pos + 1 : pos + 1 + after])
    text = f"{left}«{decode(row[pos])}»{right}"
    return " ".join(text.split())


def _fmt(text: str) -> str:
    return repr(text) if not text or text != text.strip() or not _is_wordy(text) else text


@torch.no_grad()
def describe_features(
    sae: SAE,
    activations: Activations,
    tokenizer: PreTrainedTokenizerBase,
    *,
    top_examples: int = 40,
    num_top_tokens: int = 8,
    num_contexts: int = 5,
    context_before: int = 12,
    context_after: int = 3,
    batch_size: int = 4096,
    progress: bool = True,
    stop: StopCheck = None,
) -> list[dict]:
    """One dict per latent: index, label, description, max_activation, activation_frequency, top_tokens, examples.

    sae: anything with encode(x [B, d_in]) -> [B, d_sae] (the engine's SAE, or to_saelens(...)).
    top_tokens are the stripped token strings most frequent among the top_examples strongest
    activations; the label names the most frequent whole word there, then the next ones.
    A latent that never fires gets an empty label and max_activation 0.
    """
    acts = activations.acts
    d_sae = int(sae.W_dec.shape[0])
    top_vals = torch.full((top_examples, d_sae), -1.0)
    top_rows = torch.zeros((top_examples, d_sae), dtype=torch.long)
    counts = torch.zeros(d_sae, dtype=torch.long)
    for start in tqdm(range(0, len(acts), batch_size), desc="describing features", disable=not progress):
        check_stop(stop)
        f = sae.encode(acts[start : start + batch_size].to(sae.W_dec.dtype)).float()
        counts += (f > 0).sum(dim=0)
        vals, rows = f.topk(min(top_examples, len(f)), dim=0)
        merged_vals = torch.cat([top_vals, vals])
        merged_rows = torch.cat([top_rows, rows + start])
        best = merged_vals.topk(top_examples, dim=0).indices
        top_vals = merged_vals.gather(0, best)
        top_rows = merged_rows.gather(0, best)

    decode = _Decoder(tokenizer)
    seq_len = activations.token_ids.shape[1]
    token_rows = activations.token_ids.tolist()
    positions = activations.positions
    features = []
    for index in tqdm(range(d_sae), desc="labelling features", disable=not progress):
        max_activation = max(0.0, float(top_vals[0, index]))
        frequency = float(counts[index]) / len(acts)
        if counts[index] == 0:
            features.append(
                {
                    "index": index,
                    "label": "",
                    "description": "Never fires on the training corpus (dead latent).",
                    "max_activation": 0.0,
                    "activation_frequency": 0.0,
                    "top_tokens": [],
                    "examples": [],
                }
            )
            continue
        tokens, words, contexts = [], [], []
        live = top_vals[:, index] > 0
        for value, row_index in zip(top_vals[live, index].tolist(), top_rows[live, index].tolist()):
            flat = int(positions[row_index])
            row, pos = token_rows[flat // seq_len], flat % seq_len
            tokens.append(decode(row[pos]).strip() or decode(row[pos]))
            words.append(_word_at(row, pos, decode) or tokens[-1])
            if len(contexts) < num_contexts:
                contexts.append(f"{_context(row, pos, decode, context_before, context_after)} ({value:.1f})")
        features.append(
            {
                "index": index,
                **_label(tokens, words, frequency, max_activation, contexts),
                "max_activation": round(max_activation, 4),
                "activation_frequency": round(frequency, 6),
                "top_tokens": _most_common_forms(tokens)[:num_top_tokens],
                "examples": contexts,
            }
        )
    return features


def _most_common_forms(items: list[str]) -> list[str]:
    """Distinct items by frequency, case folded together; each shown in its most frequent spelling."""
    forms: dict[str, Counter[str]] = {}
    for item in items:
        forms.setdefault(item.lower(), Counter())[item] += 1
    ranked = sorted(forms.values(), key=lambda spellings: -sum(spellings.values()))
    return [spellings.most_common(1)[0][0] for spellings in ranked]


def _show(token: str) -> str:
    """A token as a label shows it: whitespace made visible."""
    if token.strip():
        return token
    return "⏎" if "\n" in token else "␣"


def _label(
    tokens: list[str], words: list[str], frequency: float, max_activation: float, contexts: list[str]
) -> dict:
    """A label from the tokens (and the whole words around them) at the strongest activations.

    One token behind at least 30% of them: '"head" (next, words)', the head shown as the whole
    word when the token is mostly one word's piece. Otherwise the four most frequent words.
    """
    n = len(tokens)
    head_key, head_count = Counter(token.lower() for token in tokens).most_common(1)[0]
    head_words = [word for token, word in zip(tokens, words) if token.lower() == head_key]
    ranked_words = _most_common_forms(words)
    if head_count >= 0.3 * n:
        whole, whole_count = Counter(head_words).most_common(1)[0]
        head_token = _most_common_forms([t for t in tokens if t.lower() == head_key])[0]
        head = whole if whole_count >= 0.5 * head_count else head_token
        taken = {_show(head).lower(), *(_show(word).lower() for word in head_words)}
        others = _most_common_forms([_show(w) for w in words if _show(w).lower() not in taken])[:3]
        label = f'"{_show(head)}"' + (f" ({', '.join(others)})" if others else "")
    else:
        label = " / ".join(_most_common_forms([_show(word) for word in words])[:4])
    counts = Counter(word.lower() for word in words)
    summary = ", ".join(f"{_fmt(word)} ({counts[word.lower()]})" for word in ranked_words[:6])
    description = (
        f"Strongest on {summary} of its top {n} activations. "
        f"Active on {frequency:.2%} of tokens, max activation {max_activation:.1f}. "
        f"Examples: " + " | ".join(contexts)
    )
    return {"label": label[:300], "description": description}
