"""Coupled generation: one clean row and K steered variants of one prompt, in the rows of a SlotBatch.

All rows of a run sample with the same random draw each step (shared Gumbel noise from a generator seeded
by the run's seed), so equal distributions give equal tokens and any difference between the outputs is
caused by the steering. Each row reads the prompt as it would alone (a batch of one, or the run's rows
together where the batch's kernels are row-invariant) and every decode step keeps a row's numbers
independent of the other rows (slots.py): the clean continuation is the same whatever the variants, and a
run gives the same text alone or beside other runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from steering_app.limits import MAX_VARIANTS  # plain constants: the engine stays free of Django

from ..layers import decoder_blocks
from ..loader import LoadedModel
from ..saes.sae import SAE
from ..steer import RowPlan, RowSteering, SpecError, SteeringSpec, plan_row, validate
from ..tokens import encode_chat, encode_text, eos_token_ids, pad_token_id
from .slots import PrefixCache, SlotBatch, model_forward, prefix_length

# Rows of a run: the clean one first, then its variants.
CLEAN = 0


class Stopped(Exception):
    """should_stop() asked the generation to end (the run was cancelled); raised between two steps."""


OnStep = Callable[[str, list[str]], None]  # (clean delta, [delta of each variant])


@dataclass
class VariantOutput:
    """One steered row's continuation and what the metrics reuse from generating it."""

    ids: list[int]
    text: str
    logits: torch.Tensor  # [divergence + 1, V]: the row's logits while its context equals the clean row's
    # the clean and this continuation agree on [:divergence]; capped at min(len) - 1; -1 when the prompts differ
    divergence: int
    activations: torch.Tensor  # [steps, len(capture)]: SAE-layer activations in this row, after steering


@dataclass
class Comparison:
    prompt_ids: list[int]  # the clean row's
    unsteered_ids: list[int]
    unsteered_text: str
    variants: list[VariantOutput]
    seed: int
    temperature: float
    sae_layer: int
    capture: tuple[int, ...]  # the features whose activations were recorded, in column order
    timings: dict
    clean_logits: torch.Tensor  # [len(unsteered_ids), V]: the clean row's logits before each unsteered token
    clean_activations: torch.Tensor  # [steps, len(capture)]: clean SAE-layer activations at P-1, P, ...
    # Each variant's prompt where it differs from the clean row's (a conversation's steered history), else None.
    variant_prompts: list[list[int] | None] | None = None

    def variant_prompt(self, index: int) -> list[int]:
        own = self.variant_prompts[index] if self.variant_prompts else None
        return list(self.prompt_ids if own is None else own)

    @property
    def steered(self) -> VariantOutput:
        """The first variant: the one a common one-variant comparison has."""
        return self.variants[0]


@dataclass(frozen=True)
class Request:
    """What one coupled generation computes, validated by prepare()."""

    prompt_ids: list[int]
    variants: tuple[SteeringSpec, ...]
    temperature: float
    max_new_tokens: int
    seed: int
    top_p: float | None
    sae_layer: int
    min_new_tokens: int = 0
    # Each variant's own prompt where it differs from prompt_ids (a conversation whose sides have their own
    # histories), else None for all of them.
    variant_prompts: tuple[tuple[int, ...] | None, ...] | None = None
    # Set for a conversation's turn: its rows stay in the batch after it ends, keeping the KV of its prompt's full
    # blocks for the next turn with the same key (Scheduler).
    keep: object = None

    @property
    def rows(self) -> int:
        return 1 + len(self.variants)

    @property
    def prompts(self) -> list[list[int]]:
        """Every row's prompt: the clean row's, then each variant's."""
        own = self.variant_prompts or (None,) * len(self.variants)
        return [list(self.prompt_ids)] + [list(self.prompt_ids if ids is None else ids) for ids in own]

    @property
    def tokens(self) -> int:
        """Cache positions the run needs: the longest prompt and every generated token but the last."""
        return max(map(len, self.prompts)) + self.max_new_tokens - 1

    @property
    def capture(self) -> tuple[int, ...]:
        """Every variant's features, each once, in order of appearance."""
        return tuple(dict.fromkeys(index for spec in self.variants for index in spec.feature_ids))


def prepare(
    lm: LoadedModel,
    sae: SAE,
    prompt: str,
    variants: Sequence[SteeringSpec],
    temperature: float,
    max_new_tokens: int,
    seed: int,
    top_p: float | None = None,
    chat: bool = False,
    sae_layer: int | None = None,
    min_new_tokens: int = 0,
) -> Request:
    """Validate and tokenize one request; SpecError (naming the field) when it cannot run."""
    check_generation_args(temperature, max_new_tokens, seed, top_p)
    prompt_ids = encode_text(lm.tokenizer, prompt, chat)
    return _request(
        lm, sae, [prompt_ids], variants, temperature, max_new_tokens, seed, top_p, sae_layer, min_new_tokens
    )


def prepare_turn(
    lm: LoadedModel,
    sae: SAE,
    clean_messages: list[dict],
    steered_messages: list[dict],
    spec: SteeringSpec,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    keep: object = None,
    sae_layer: int | None = None,
    min_new_tokens: int = 0,
) -> Request:
    """One turn of a conversation: the clean row reads clean_messages and the steered row steered_messages (its
    own history, or the clean one), each through the chat template, ready for the assistant's reply. keep: the
    conversation's key, so that its rows keep their KV for the next turn (Scheduler)."""
    check_generation_args(temperature, max_new_tokens, seed, None)
    prompts = [encode_chat(lm.tokenizer, messages) for messages in (clean_messages, steered_messages)]
    request = _request(
        lm, sae, prompts, (spec,), temperature, max_new_tokens, seed, None, sae_layer, min_new_tokens
    )
    return dataclasses.replace(request, keep=keep)


def _request(
    lm: LoadedModel,
    sae: SAE,
    prompts: list[list[int]],
    variants: Sequence[SteeringSpec],
    temperature: float,
    max_new_tokens: int,
    seed: int,
    top_p: float | None,
    sae_layer: int | None,
    min_new_tokens: int,
) -> Request:
    """The Request of the clean row's prompt and, where given, each variant's own (prompts[1 + k])."""
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise SpecError("min_new_tokens", f"must be an integer >= 0, got {min_new_tokens!r}")
    variants = tuple(variants)
    if not 1 <= len(variants) <= MAX_VARIANTS:
        raise SpecError(
            "variants", f"a comparison has 1 to {MAX_VARIANTS} steered variants, got {len(variants)}"
        )
    sae_layer = resolve_sae_layer(sae, sae_layer)
    for spec in variants:
        validate(spec, lm.num_layers, sae, hidden_size=lm.hidden_size, sae_layer=sae_layer)
    for prompt_ids in prompts:
        _check_fits_window(lm, prompt_ids, max_new_tokens)
    clean, own = prompts[0], prompts[1:]
    variant_prompts = None
    if any(ids != clean for ids in own):
        variant_prompts = tuple(None if ids == clean else tuple(ids) for ids in own)
    return Request(
        clean,
        variants,
        float(temperature),
        max_new_tokens,
        seed,
        top_p,
        sae_layer,
        min_new_tokens,
        variant_prompts,
    )


def _check_fits_window(lm: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise SpecError("prompt", "is empty")
    window = lm.context_window
    if window is None:
        return
    if len(prompt_ids) >= window:
        raise SpecError("prompt", f"{len(prompt_ids)} tokens do not fit the context window of {window}")
    if len(prompt_ids) + max_new_tokens > window:
        raise SpecError(
            "max_new_tokens",
            f"{len(prompt_ids)} prompt tokens + {max_new_tokens} exceed the context window of {window}",
        )


class Generation:
    """One request's rows in a SlotBatch: its prefill, sampling, streaming and result.

    prefill() writes the prompt's KV into the rows it was given; then, each step, advance() samples from
    the rows' logits and sets their next inputs, and receive() takes the rows' new logits from the step.
    """

    def __init__(
        self,
        lm: LoadedModel,
        sae: SAE,
        request: Request,
        on_step: OnStep | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.lm, self.sae, self.request = lm, sae, request
        self.on_step = on_step
        self.should_stop = should_stop or _never
        tokenizer = lm.tokenizer
        self.eos_ids = eos_token_ids(tokenizer, lm.model)
        self.eos_index = torch.tensor(sorted(self.eos_ids), device=lm.device, dtype=torch.long)
        self.pad_id = pad_token_id(tokenizer, lm.model)
        self.generator = torch.Generator(device=lm.device).manual_seed(request.seed)
        count = request.rows
        self.plans = [
            plan_row(sae, request.sae_layer, spec, request.capture) for spec in (None, *request.variants)
        ]
        self.rows: list[int] = []
        self._row_index: torch.Tensor | None = None  # the rows as a tensor on the device
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.finished = [False] * count
        self.streams = [_TextStream(tokenizer) for _ in range(count)]
        self.clean_logits: list[torch.Tensor] = []
        self.variant_logits: list[list[torch.Tensor]] = [[] for _ in request.variants]
        # The step at which each variant's context first differs from the clean row's: -1 when its prompt does.
        prompts = request.prompts
        self.first_difference: list[int | None] = [
            None if prompts[1 + k] == prompts[CLEAN] else -1 for k in range(len(request.variants))
        ]
        self.records: list[list[torch.Tensor]] = [[] for _ in range(count)]
        self.logits: torch.Tensor | None = None  # [rows, V] for the next token
        self.step = 0
        self.timings: dict = {}
        self._decode_started = 0.0

    @torch.inference_mode()
    def prefill(self, batch: SlotBatch, rows: list[int], kept: list[list[int]] | None = None) -> None:
        """The run's rows read their prompts, each as it would alone (so the clean row never depends on the
        variants), and take their seats in the batch: in one forward where the rows share their prompt and the
        batch's kernels make that row-invariant, else one batch-of-one read per row.

        kept: the prompts `rows` read at the previous turn of the same conversation, whose KV they still hold
        (Scheduler): each row then reads only what follows the full blocks its new prompt shares with its old one.
        """
        started = time.perf_counter()
        self.rows = rows
        # Made once: indexing each step's logits with a list would copy the list to the device every step.
        self._row_index = torch.tensor(rows, device=self.lm.device)
        prompts = self.request.prompts
        self.timings = {"slots": list(rows), "prompt_tokens": [len(ids) for ids in prompts]}
        if kept is None and self.request.variant_prompts is None and batch.prefills_together():
            _check_stop(self.should_stop)
            self.logits = self._prefill_lean(batch, rows, self.plans, 0, prompts[0])
            self.timings["reused_tokens"] = [0] * len(rows)
        else:
            kept = kept or [None] * len(rows)
            read = [
                self._prefill_row(batch, row, plan, index, prompt, old)
                for index, (plan, row, prompt, old) in enumerate(zip(self.plans, rows, prompts, kept))
            ]
            self.logits = torch.stack([logits for logits, _ in read])
            self.timings["reused_tokens"] = [reused for _, reused in read]
        self.timings["prefill"] = time.perf_counter() - started
        self._decode_started = time.perf_counter()

    def _prefill_lean(
        self,
        batch: SlotBatch,
        rows: list[int],
        plans: list[RowPlan],
        first: int,
        prompt: list[int],
        prefix: PrefixCache | None = None,
    ) -> torch.Tensor:
        """Rows read the prompt through the lean step and take their seats; plans[i] is the run's row first + i."""
        logits, records, cache = batch.prefill(prompt, plans, prefix)
        for offset, (plan, row) in enumerate(zip(plans, rows)):
            self._record(records, offset, plan, first + offset)
            batch.seat(row, plan, cache, len(prompt), source_row=offset)
        return logits

    def _prefill_row(
        self, batch: SlotBatch, row: int, plan: RowPlan, index: int, prompt: list[int], kept: list[int] | None
    ) -> tuple[torch.Tensor, int]:
        """One row reads its prompt: its logits for the first token, and how many positions it reused from the
        row's kept KV (the full blocks its old prompt `kept` shares with this one; the lean step only)."""
        _check_stop(self.should_stop)
        if batch.lean_usable():
            reused = prefix_length(min(shared_length(kept, prompt), len(prompt) - 1)) if kept else 0
            prefix = batch.prefix(row, reused) if reused else None
            return self._prefill_lean(batch, [row], [plan], index, prompt, prefix)[0], reused
        ids = torch.tensor([prompt], device=self.lm.device)
        steering = RowSteering(decoder_blocks(self.lm.model), 1)
        steering.special_mask = torch.isin(ids, batch.special_ids)
        steering.assign(0, plan)
        cache = new_cache(self.lm.model)
        with steering.attached():
            logits = model_forward(self.lm.model, ids, cache, logits_to_keep=1)[0, -1].float()
        self._record(steering.records(), 0, plan, index)
        batch.seat(row, plan, cache, ids.shape[1])
        return logits, 0

    def _record(self, records: dict[int, torch.Tensor], source_row: int, plan: RowPlan, index: int) -> None:
        if plan.capture:
            # A copy: on a GPU the records are views into the captured step's output, rewritten every step.
            self.records[index].append(records[source_row][-1].clone())

    def receive(self, step_logits: torch.Tensor, records: dict[int, torch.Tensor]) -> None:
        """The rows' logits and SAE records from a batch step."""
        self.logits = step_logits.index_select(0, self._row_index)
        for index, (row, plan) in enumerate(zip(self.rows, self.plans)):
            self._record(records, row, plan, index)

    def advance(self, batch: SlotBatch) -> bool:
        """Sample each row's next token from its logits, stream it, and feed it; True when the run is done."""
        request, step = self.request, self.step
        logits = self.logits
        if not self.finished[CLEAN]:
            self.clean_logits.append(logits[CLEAN])
        for k, first in enumerate(self.first_difference):
            if first is None:
                self.variant_logits[k].append(logits[1 + k])
        if step < request.min_new_tokens:
            # Only the sampling sees the ban; the stored logits stay the model's distribution.
            logits = logits.index_fill(-1, self.eos_index, float("-inf"))
        sampled = sample_coupled(logits, request.temperature, request.top_p, self.generator).tolist()
        alive = [not done for done in self.finished]
        for index, token in enumerate(sampled):
            if alive[index]:
                self.tokens[index].append(token)
                self.finished[index] = token in self.eos_ids
        clean = self.tokens[CLEAN]
        for k, first in enumerate(self.first_difference):
            own = self.tokens[1 + k]
            if first is None and (len(own) != len(clean) or own[-1] != clean[-1]):
                self.first_difference[k] = step
        self._stream(alive)
        self.step += 1
        if all(self.finished) or self.step == request.max_new_tokens:
            self._stream_rest()
            self.timings["decode"] = time.perf_counter() - self._decode_started
            return True
        for index, row in enumerate(self.rows):
            batch.set_input(row, self.tokens[index][-1] if not self.finished[index] else self.pad_id)
        _check_stop(self.should_stop)
        return False

    def _stream(self, alive: list[bool]) -> None:
        if self.on_step is None:
            return
        deltas = [
            stream.delta(tokens) if live else ""
            for stream, tokens, live in zip(self.streams, self.tokens, alive)
        ]
        if any(deltas):
            self.on_step(deltas[0], deltas[1:])

    def _stream_rest(self) -> None:
        if self.on_step is None:
            return
        deltas = [stream.delta(tokens, final=True) for stream, tokens in zip(self.streams, self.tokens)]
        if any(deltas):
            self.on_step(deltas[0], deltas[1:])

    def result(self) -> Comparison:
        request, tokenizer = self.request, self.lm.tokenizer
        clean = self.tokens[CLEAN]
        width = len(request.capture)
        activations = [
            torch.stack(records) if records else torch.zeros(self.step, width, device=self.lm.device)
            for records in self.records
        ]
        variants = []
        for k, first in enumerate(self.first_difference):
            own = self.tokens[1 + k]
            first = min(len(clean), len(own)) if first is None else first
            divergence = min(first, len(clean) - 1, len(own) - 1)
            shared = self.variant_logits[k][: divergence + 1]
            variants.append(
                VariantOutput(
                    ids=own,
                    text=tokenizer.decode(own, skip_special_tokens=True),
                    logits=torch.stack(shared) if shared else self.logits.new_zeros(0, self.logits.shape[-1]),
                    divergence=divergence,
                    activations=activations[1 + k],
                )
            )
        timings = dict(self.timings)
        timings["generate"] = timings.get("prefill", 0.0) + timings.get("decode", 0.0)
        return Comparison(
            prompt_ids=list(request.prompt_ids),
            unsteered_ids=clean,
            unsteered_text=tokenizer.decode(clean, skip_special_tokens=True),
            variants=variants,
            seed=request.seed,
            temperature=request.temperature,
            sae_layer=request.sae_layer,
            capture=request.capture,
            timings=timings,
            clean_logits=torch.stack(self.clean_logits),
            clean_activations=activations[CLEAN],
            variant_prompts=None if request.variant_prompts is None else list(request.variant_prompts),
        )


def shared_length(a: Sequence, b: Sequence) -> int:
    """How many leading items (token ids, characters) a and b have in common."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _never() -> bool:
    return False


def _check_stop(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise Stopped("generation stopped: the run was cancelled")


def new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _gumbel_noise(vocab: int, generator: torch.Generator, device) -> torch.Tensor:
    uniform = torch.rand(vocab, generator=generator, device=device)
    return -torch.log(-torch.log(uniform))


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside each row's nucleus (smallest set with mass >= top_p) to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_coupled(
    logits: torch.Tensor, temperature: float, top_p: float | None, generator: torch.Generator
) -> torch.Tensor:
    """One token per row; every row uses the same noise, so equal rows pick equal tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if top_p is not None and top_p < 1:
        scaled = _top_p_filter(scaled, top_p)
    return (scaled + _gumbel_noise(logits.shape[-1], generator, logits.device)).argmax(dim=-1)


class _TextStream:
    """Text deltas of a growing token list; holds back a trailing incomplete multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sent = ""

    def delta(self, ids: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent):
            # Decoding more tokens rewrote earlier text (rare); send only what extends it.
            common = shared_length(text, self.sent)
            self.sent = text[:common] + self.sent[common:]
            return ""
        out, self.sent = text[len(self.sent) :], text
        return out


def check_generation_args(temperature: object, max_new_tokens: object, seed: object, top_p: object) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SpecError("max_new_tokens", f"must be an integer >= 1, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise SpecError("temperature", f"must be a finite number >= 0, got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise SpecError("seed", f"must be an integer in [0, 2**63), got {seed!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise SpecError("top_p", f"must be in (0, 1], got {top_p!r}")


def resolve_sae_layer(sae: SAE, sae_layer: int | None) -> int:
    if sae_layer is None:
        sae_layer = sae.hook_layer
    if sae_layer is None:
        raise SpecError("sae_layer", "unknown: pass it or set metadata.hook_name in the SAE's cfg.json")
    return sae_layer
