"""Coupled dual generation: one forward per step over two rows, row 0 clean and row 1 steered.

Both rows sample with the same random draw each step (shared Gumbel noise from a generator seeded by
the run's seed), so equal distributions give equal tokens and any difference between the outputs is
caused by the steering. The clean row's computation never depends on the steered row's content, so
the unsteered continuation is the same whatever the features.

Every forward runs both rows through every block, prompt included. Sharing the blocks below the
lowest intervention layer while the rows hold the same tokens would save time, but it would run the
clean row at batch size 1 for some blocks and 2 for others, depending on the features and on when
the rows diverge, and matrix kernels do not give bit-identical results across batch sizes: the
unsteered continuation would then depend (rarely, in the last bits) on the features.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .layers import block_hidden, decoder_blocks
from .loader import LoadedModel
from .sae import SAE
from .steer import SpecError, SteeringSpec, steering_hooks, validate

if TYPE_CHECKING:
    from transformers import DynamicCache

CLEAN, STEERED = 0, 1


class Stopped(Exception):
    """should_stop() asked the generation to end (the run was cancelled); raised between two steps."""


@dataclass
class Comparison:
    prompt_ids: list[int]
    unsteered_ids: list[int]
    steered_ids: list[int]
    unsteered_text: str
    steered_text: str
    seed: int
    temperature: float
    sae_layer: int
    timings: dict[str, float]
    # What the metrics reuse from generation (see metrics.py):
    clean_logits: torch.Tensor  # [len(unsteered_ids), V]: row 0's logits before each unsteered token
    steered_logits: torch.Tensor  # [divergence + 1, V]: row 1's logits while its context equals row 0's
    divergence: int  # continuations agree on [:divergence]; capped at min(len) - 1
    clean_activations: torch.Tensor  # [steps, k]: clean SAE-layer activations at positions P-1, P, ...
    steered_activations: torch.Tensor  # [steps, k]: the same in the steered row, after the intervention
    cache: object | None = field(default=None, repr=False)  # the KV cache, consumed by the metrics


@functools.cache
def _forward_kwargs(model_class: type) -> tuple[str, bool]:
    """The cache keyword of this transformers version and whether logits_to_keep is accepted."""
    params = inspect.signature(model_class.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def new_cache(model: torch.nn.Module) -> DynamicCache:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_is_plain(cache: object) -> bool:
    """True when every layer is a plain growing KV layer that can be cropped and re-indexed."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def reshape_cache(cache: DynamicCache, rows: list[int], length: int) -> None:
    """Keep the given rows (in that order, repeats allowed) and the first `length` positions."""
    index = None
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        if index is None:
            index = torch.tensor(rows, device=layer.keys.device)
        layer.keys = layer.keys[:, :, :length].index_select(0, index)
        layer.values = layer.values[:, :, :length].index_select(0, index)


def model_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, cache: DynamicCache, logits_last_only: bool = False
) -> torch.Tensor:
    cache_kw, has_logits_to_keep = _forward_kwargs(type(model))
    kwargs = {cache_kw: cache, "use_cache": True}
    if logits_last_only and has_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, **kwargs).logits


@contextmanager
def capture_hook(
    blocks: torch.nn.ModuleList, layer: int, sae: SAE, feature_ids: Iterable[int], rows: Sequence[int]
) -> Iterator[list[torch.Tensor | None]]:
    """Record the SAE activations of the given features in the given rows at block `layer`'s output.

    Registered after the steering hooks, so a steered row is read after its intervention. Yields a
    list that receives one [len(rows), seq, k] tensor per forward (None when there are no features).
    """
    records: list[torch.Tensor | None] = []
    feature_ids = list(feature_ids)

    def hook(module, args, output):
        if feature_ids:
            records.append(sae.encode_features(block_hidden(output)[list(rows)], feature_ids).float())
        else:
            records.append(None)

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield records
    finally:
        handle.remove()


class _SkinnyLinear(torch.nn.Linear):
    """nn.Linear computing W @ x.T when the input has 2 to 4 rows.

    On CPU, F.linear's x @ W.T with 2 rows takes a GEMM path that costs about 1.55x its 1-row GEMV;
    W @ x.T with 2 to 4 columns streams the weights once and is cheaper still than the 1-row GEMV
    (a SmolLM2 decode step on the 2-core dev machine: 1 row 38 ms; 2 rows 60 ms through F.linear,
    23 ms through W @ x.T). Each row's result does not depend on the other rows' values, so the
    clean row still never sees the steered one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 2 <= rows <= 4:
            return super().forward(x)
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).T).T.contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


@contextmanager
def skinny_linears(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Swap the model's nn.Linear modules to _SkinnyLinear for one call (CPU only), then back.

    Scoped to the call (which holds the model's lock) so that every other use of the cached model,
    plain generate included, keeps nn.Linear; inputs of 1 or more than 4 rows take nn.Linear's path
    even during the call.
    """
    if device.type != "cpu":
        yield
        return
    swapped = [module for module in model.modules() if type(module) is torch.nn.Linear]
    for module in swapped:
        module.__class__ = _SkinnyLinear
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = torch.nn.Linear


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
            common = 0
            for a, b in zip(text, self.sent):
                if a != b:
                    break
                common += 1
            self.sent = text[:common] + self.sent[common:]
            return ""
        out, self.sent = text[len(self.sent) :], text
        return out


def eos_token_ids(lm: LoadedModel) -> set[int]:
    ids = set()
    configured = getattr(lm.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    return ids


def encode_prompt(lm: LoadedModel, prompt: str, chat: bool) -> list[int]:
    tokenizer = lm.tokenizer
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SpecError("chat", "this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt).input_ids)


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


def compare(
    lm: LoadedModel,
    sae: SAE,
    prompt: str,
    spec: SteeringSpec,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    top_p: float | None = None,
    chat: bool = False,
    on_step: Callable[[str, str], None] | None = None,
    sae_layer: int | None = None,
    min_new_tokens: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> Comparison:
    """Generate the unsteered and the steered continuation of prompt together.

    min_new_tokens: EOS cannot be sampled before this many tokens (benchmarks use min = max).
    should_stop: asked before every forward (prefill and each decode step); when it returns True the
    generation raises Stopped, so a cancelled run frees the model within one step.
    """
    started = time.perf_counter()
    check_generation_args(temperature, max_new_tokens, seed, top_p)
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise SpecError("min_new_tokens", f"must be an integer >= 0, got {min_new_tokens!r}")
    sae_layer = resolve_sae_layer(sae, sae_layer)
    validate(spec, lm.num_layers, sae, hidden_size=lm.hidden_size, sae_layer=sae_layer)
    prompt_ids = encode_prompt(lm, prompt, chat)
    if not prompt_ids:
        raise SpecError("prompt", "is empty")
    window = lm.context_window
    if window is not None:
        if len(prompt_ids) >= window:
            raise SpecError("prompt", f"{len(prompt_ids)} tokens do not fit the context window of {window}")
        if len(prompt_ids) + max_new_tokens > window:
            raise SpecError(
                "max_new_tokens",
                f"{len(prompt_ids)} prompt tokens + {max_new_tokens} exceed the context window of {window}",
            )
    job = _Job(prompt_ids, spec, float(temperature), max_new_tokens, seed, top_p, sae_layer, min_new_tokens)
    with lm.lock:
        return _generate(lm, sae, job, on_step, should_stop or _never, started)


def _never() -> bool:
    return False


@dataclass(frozen=True)
class _Job:
    """What one coupled generation computes, validated by compare()."""

    prompt_ids: list[int]
    spec: SteeringSpec
    temperature: float
    max_new_tokens: int
    seed: int
    top_p: float | None
    sae_layer: int
    min_new_tokens: int


@torch.inference_mode()
def _generate(
    lm: LoadedModel,
    sae: SAE,
    job: _Job,
    on_step: Callable[[str, str], None] | None,
    should_stop: Callable[[], bool],
    started: float,
) -> Comparison:
    model, tokenizer, device = lm.model, lm.tokenizer, lm.device
    blocks = decoder_blocks(model)
    timings = {"tokenize": time.perf_counter() - started}
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device, dtype=torch.long)
    eos_ids = eos_token_ids(lm)
    eos_index = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long)
    pad_id = next(iter(sorted(eos_ids)), 0) if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    generator = torch.Generator(device=device).manual_seed(job.seed)
    cache = new_cache(model)
    prompt = torch.tensor([job.prompt_ids, job.prompt_ids], device=device)
    tokens = [[], []]
    finished = [False, False]
    clean_logits: list[torch.Tensor] = []
    steered_logits: list[torch.Tensor] = []
    first_difference = None
    streams = [_TextStream(tokenizer), _TextStream(tokenizer)]

    with ExitStack() as stack:
        stack.enter_context(skinny_linears(model, device))
        control = stack.enter_context(
            steering_hooks(
                blocks,
                sae,
                job.spec,
                job.sae_layer,
                rows=(STEERED,),
                special_mask=torch.isin(prompt, special_ids),
            )
        )
        records = stack.enter_context(
            capture_hook(blocks, job.sae_layer, sae, job.spec.feature_ids, rows=(CLEAN, STEERED))
        )

        t0 = time.perf_counter()
        _check_stop(should_stop)
        logits = model_forward(model, prompt, cache, logits_last_only=True)
        timings["prefill"] = time.perf_counter() - t0
        t0 = time.perf_counter()

        for step in range(job.max_new_tokens):
            step_logits = logits[:, -1, :].float()
            if not finished[CLEAN]:
                clean_logits.append(step_logits[CLEAN])
            if first_difference is None:
                steered_logits.append(step_logits[STEERED])
            if step < job.min_new_tokens:
                # Only the sampling sees the ban; the stored logits stay the model's distribution.
                step_logits = step_logits.index_fill(-1, eos_index, float("-inf"))
            sampled = sample_coupled(step_logits, job.temperature, job.top_p, generator).tolist()
            alive = [not finished[CLEAN], not finished[STEERED]]
            for row in (CLEAN, STEERED):
                if alive[row]:
                    tokens[row].append(sampled[row])
                    finished[row] = sampled[row] in eos_ids
            if first_difference is None and (
                len(tokens[CLEAN]) != len(tokens[STEERED]) or tokens[CLEAN][-1] != tokens[STEERED][-1]
            ):
                first_difference = step
            if on_step is not None:
                deltas = [streams[row].delta(tokens[row]) if alive[row] else "" for row in (CLEAN, STEERED)]
                if deltas[0] or deltas[1]:
                    on_step(deltas[0], deltas[1])
            if all(finished) or step == job.max_new_tokens - 1:
                break
            fed = [tokens[row][-1] if not finished[row] else pad_id for row in (CLEAN, STEERED)]
            next_input = torch.tensor([[fed[CLEAN]], [fed[STEERED]]], device=device)
            control.special_mask = torch.isin(next_input, special_ids)
            _check_stop(should_stop)
            logits = model_forward(model, next_input, cache)
        timings["decode"] = time.perf_counter() - t0

    if on_step is not None:
        final = [streams[row].delta(tokens[row], final=True) for row in (CLEAN, STEERED)]
        if final[0] or final[1]:
            on_step(final[0], final[1])

    n_clean, n_steered = len(tokens[CLEAN]), len(tokens[STEERED])
    if first_difference is None:
        first_difference = min(n_clean, n_steered)
    divergence = min(first_difference, n_clean - 1, n_steered - 1)
    activations = _stack_records(records, len(job.spec.feature_ids), device)
    timings["generate"] = timings["prefill"] + timings["decode"]
    return Comparison(
        prompt_ids=list(job.prompt_ids),
        unsteered_ids=tokens[CLEAN],
        steered_ids=tokens[STEERED],
        unsteered_text=tokenizer.decode(tokens[CLEAN], skip_special_tokens=True),
        steered_text=tokenizer.decode(tokens[STEERED], skip_special_tokens=True),
        seed=job.seed,
        temperature=job.temperature,
        sae_layer=job.sae_layer,
        timings=timings,
        clean_logits=torch.stack(clean_logits),
        steered_logits=torch.stack(steered_logits[: divergence + 1]),
        divergence=divergence,
        clean_activations=activations[CLEAN],
        steered_activations=activations[STEERED],
        cache=cache,
    )


def _check_stop(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise Stopped("generation stopped: the run was cancelled")


def _stack_records(records, k: int, device) -> list[torch.Tensor]:
    """Per row, the activations at the last position of each forward: positions P-1, P, P+1, ..."""
    if not k:
        empty = torch.zeros(len(records), 0, device=device)
        return [empty, empty]
    last = torch.stack([record[:, -1, :] for record in records], dim=1)  # [rows, steps, k]
    return [last[CLEAN], last[STEERED]]
