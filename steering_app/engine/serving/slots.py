"""A batch of fixed-shape slots: R rows over a KV cache of fixed length, every decode step over all R rows.

Runs share the steps of one batch (continuous batching): a run is prefilled on its own, its KV written
into free rows, and it joins at the next step; it leaves when it ends. Each row has its own write
position, starting at 0, its own position ids and its own attention mask, so a row's keys sit where
they would sit alone and every operation of a step is row-wise: a row's numbers depend only on its own
inputs, never on which other runs share the batch. Matrix kernels may change their reduction order
with the row count, so a step runs all R rows, empty ones included, unless the kernels chosen for this
machine were shown to give every row the same bits at any row count (kernels.py, and a probe step
here): then a step runs only rows [0, last occupied], and a lone run pays for its own rows only.
transformers' StaticCache shares one write position across rows, hence this Cache of ours and the
grouped attention below.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from steering_app import engine_config  # plain settings: the engine stays free of Django

from ..layers import decoder_blocks
from ..loader import LoadedModel
from ..steer import RowSteering
from ..tokens import special_id_tensor
from .lean import TOLERANCE, LeanStep, has_hooks
from .plan import AUTO, StepPlan, StepPolicy, choose_kernels, decide

logger = logging.getLogger(__name__)

ATTENTION = "steerlab_slots"
SPAN_STEP = 64  # positions a step attends to, in multiples of this (when the kernels allow trimming)
# A prompt is read in blocks of this many positions, aligned to position 0 (SlotBatch.prefill): a token's keys
# and values then depend only on the tokens up to its block's end, never on where an earlier read stopped, so a
# conversation's next turn may reuse the full blocks of the history it already read and get the same bits as
# reading the whole history afresh.
PREFILL_BLOCK = 64


class SlotCache(Cache):
    """Keys and values [rows, kv_heads, length, head_dim] per layer; write_positions [rows, seq] says where
    the next forward's tokens go. Layers are allocated at their first write (their shapes come from it)."""

    def __init__(self, rows: int, length: int):
        super().__init__(layers=[])
        self.rows = rows
        self.length = length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write_positions: torch.Tensor | None = None
        self.span = length  # a step attends to positions [0, span) of each row (SlotBatch._forward)

    def _allocate(self, layer: int, like: torch.Tensor) -> None:
        if layer not in self.keys:
            shape = (self.rows, like.shape[1], self.length, like.shape[3])
            self.keys[layer] = like.new_zeros(shape)
            self.values[layer] = like.new_zeros(shape)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._allocate(layer_idx, key_states)
        # A step may cover only the first rows and positions (SlotBatch.step): views, written in place.
        count = key_states.shape[0]
        keys = self.keys[layer_idx][:count, :, : self.span]
        values = self.values[layer_idx][:count, :, : self.span]
        # A scatter along the position axis touches only the new entries (indexing rows and positions with a
        # slice between them made PyTorch copy the whole cache, most of a CPU step at 6 rows).
        index = self.write_positions[:, None, :, None].expand_as(key_states)
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys, values

    def write_prompt(self, row: int, prefilled: Cache, length: int, source_row: int = 0) -> None:
        """Copy a prefill's KV (source_row of a DynamicCache, a SlotCache or a PrefixCache) into `row` at
        positions [0, length) and clear the rest."""
        if isinstance(prefilled, SlotCache | PrefixCache):
            layers = [(prefilled.keys[layer], prefilled.values[layer]) for layer in sorted(prefilled.keys)]
        else:
            layers = [(cached.keys, cached.values) for cached in prefilled.layers]
        for layer, (keys, values) in enumerate(layers):
            self._allocate(layer, keys)
            self.keys[layer][row].zero_()
            self.values[layer][row].zero_()
            self.keys[layer][row, :, :length] = keys[source_row, :, :length]
            self.values[layer][row, :, :length] = values[source_row, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are per row and always passed explicitly

    @property
    def is_compileable(self) -> bool:
        return True


class PrefixCache(Cache):
    """The keys and values of a prompt read so far, [rows, kv_heads, positions, head_dim] per layer, grown by
    concatenation: each block's forward sees contiguous tensors of exactly the positions before its end, the
    same layout whether the earlier blocks were read just now or copied from a kept row (SlotBatch.prefill)."""

    def __init__(
        self, keys: dict[int, torch.Tensor] | None = None, values: dict[int, torch.Tensor] | None = None
    ):
        super().__init__(layers=[])
        self.keys = keys or {}
        self.values = values or {}

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.keys:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def grouped_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs
):
    """Attention over the slot cache without repeating the KV heads (a copy of the whole cache per layer).

    query [R, heads, seq, D], key/value [R, kv_heads, length, D], attention_mask [R, 1, seq, length] bool
    (True = attend). Batched over rows, so each row is computed alone.
    """
    rows, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if scaling is None:
        scaling = getattr(module, "scaling", dim**-0.5)
    grouped = query.reshape(rows, kv_heads, groups * seq, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(rows, kv_heads, groups, seq, -1)
    scores = scores.masked_fill(~attention_mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs.view(rows, kv_heads, groups * seq, -1), value).view(rows, heads, seq, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, grouped_attention)


def sdpa_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """grouped_attention's contract through PyTorch's fused attention (a few kernels instead of about ten)."""
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def lean_attention(device: torch.device):
    """The lean step's attention: fused on a GPU, where a step is bound by its kernel count; grouped_attention
    on a CPU, whose bits were shown invariant to row count and attended span (the fused CPU kernel's were not
    checked)."""
    return sdpa_attention if device.type == "cuda" else grouped_attention


@contextmanager
def slot_attention(model: torch.nn.Module) -> Iterator[None]:
    """The model's attention through grouped_attention for one forward (under the model's lock)."""
    configs = _configs(model)
    saved = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = ATTENTION
        yield
    finally:
        for config, implementation in zip(configs, saved):
            config._attn_implementation = implementation


_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _configs(model: torch.nn.Module) -> list:
    """The model's distinct configs (found once: walking the modules every step costs a millisecond)."""
    if model not in _CONFIGS:
        found = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
        _CONFIGS[model] = list(found.values())
    return _CONFIGS[model]


@functools.cache
def _forward_kwargs(model_class: type) -> tuple[str, bool]:
    """The cache keyword of this transformers version and whether logits_to_keep is accepted."""
    params = inspect.signature(model_class.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def model_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache | None, logits_to_keep: int = 0, **kwargs
) -> torch.Tensor:
    """The model's logits for input_ids, continuing `cache` (None: no cache); logits_to_keep > 0 keeps only
    the last positions' logits where the model supports it."""
    cache_kw, has_logits_to_keep = _forward_kwargs(type(model))
    if cache is not None:
        kwargs.update({cache_kw: cache, "use_cache": True})
    else:
        kwargs["use_cache"] = False
    if logits_to_keep and has_logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    return model(input_ids=input_ids, **kwargs).logits


def use_cuda_graphs(device: torch.device) -> bool:
    """On CUDA unless configured off (STEERLAB_CUDA_GRAPHS=0): a decode step is then one graph launch instead of
    hundreds of kernel launches from Python, which bound it at small batch sizes."""
    return device.type == "cuda" and engine_config.current.cuda_graphs


class SlotBatch:
    """R rows and a KV cache of `length` positions on one model; step() runs one token for every taken row.

    Rows are handed out with take() (lowest first) and given back with give_back(). A step runs rows
    [0, step_rows()): all R, free ones included (their numbers are discarded), unless occupied_only, when
    it stops at the last occupied row. How a step runs is decided once, here: `plan` (plan.py), from
    `policy`. The caller holds the model's lock.
    """

    def __init__(self, lm: LoadedModel, rows: int, length: int, policy: StepPolicy = AUTO):
        self.lm = lm
        self.rows = rows
        self.length = length
        self.cache = SlotCache(rows, length)
        self.steering = RowSteering(decoder_blocks(lm.model), rows)
        self.positions = torch.zeros(rows, dtype=torch.long, device=lm.device)
        self.inputs = torch.zeros(rows, dtype=torch.long, device=lm.device)
        self.free = list(range(rows))
        self._advancing = torch.zeros(rows, dtype=torch.long, device=lm.device)  # 1 for taken rows
        self._span = torch.arange(length, device=lm.device)
        self.special_ids = special_id_tensor(lm.tokenizer).to(lm.device)
        self.policy = policy
        self.kernels = choose_kernels(policy, lm.model, rows, lm.device)
        # The lean step is a candidate until the plan's probe steps compare it with the modules.
        self.lean: LeanStep | None = (
            LeanStep(lm.model, length, lean_attention(lm.device))
            if policy.lean != "off" and LeanStep.supports(lm.model)
            else None
        )
        self.plan: StepPlan = self._decide()
        if not self.plan.lean:
            self.lean = None
        # The step's CUDA graphs are kept per steering structure, with its tensors (RowSteering.structure).
        self._graph_pool = torch.cuda.graph_pool_handle() if self.plan.graphs else None

    @property
    def occupied_only(self) -> bool:
        return self.plan.occupied_rows

    def take(self, count: int) -> list[int] | None:
        """`count` free rows, or None when fewer are free."""
        if count > len(self.free):
            return None
        taken, self.free = self.free[:count], self.free[count:]
        self._advancing[taken] = 1
        return taken

    def give_back(self, rows: list[int]) -> None:
        for row in rows:
            self.steering.assign(row, None)
            self.positions[row] = 0
            self.inputs[row] = 0
        self._advancing[rows] = 0
        self.free = sorted(self.free + list(rows))

    def park(self, rows: list[int], lengths: list[int]) -> None:
        """Keep rows taken but out of the steps' work: no steering, not advancing, each row's next (discarded)
        writes at position lengths[i], past the prefix [0, lengths[i]) that a later prefix() copies."""
        for row, length in zip(rows, lengths):
            self.steering.assign(row, None)
            self.positions[row] = length
            self.inputs[row] = 0
        self._advancing[rows] = 0

    def resume(self, rows: list[int]) -> None:
        """Parked rows advance again (seat() gives them their new prompt)."""
        self._advancing[rows] = 1

    def prefix(self, row: int, length: int) -> PrefixCache:
        """A copy of the row's keys and values at positions [0, length): a prompt's full blocks, to read the rest
        of a longer prompt from (prefill)."""
        return PrefixCache(
            {layer: keys[row : row + 1, :, :length].clone() for layer, keys in self.cache.keys.items()},
            {layer: values[row : row + 1, :, :length].clone() for layer, values in self.cache.values.items()},
        )

    def set_input(self, row: int, token: int) -> None:
        self.inputs[row] = token

    def seat(self, row: int, plan, prefilled: Cache, length: int, source_row: int = 0) -> None:
        """Put a prefilled row (its KV for `length` prompt tokens, its steering plan) into `row`."""
        self.cache.write_prompt(row, prefilled, length, source_row)
        self.positions[row] = length
        self.steering.assign(row, plan)

    def lean_usable(self) -> bool:
        """Whether forwards may take the lean step now (none does while hooks are on the model's modules)."""
        return self.lean is not None and not has_hooks(self.lm.model)

    def prefills_together(self) -> bool:
        """Whether a run's rows may read the prompt in one forward (prefill): with row-invariant kernels and
        the lean step, a row's prefill is the same alone or beside its run's other rows."""
        return self.occupied_only and self.lean_usable()

    @torch.inference_mode()
    def prefill(
        self, prompt_ids: list[int], plans: list, prefix: PrefixCache | None = None
    ) -> tuple[torch.Tensor, dict, PrefixCache]:
        """The lean step over len(plans) rows (row i steered by plans[i]), each reading the prompt from the end of
        `prefix` (the KV of its first full blocks; None: from position 0) in blocks of PREFILL_BLOCK positions:
        the last position's logits [rows, V], the last block's SAE records ({row: [block, width]}) and the
        PrefixCache of the whole prompt's KV."""
        rows, length = len(plans), len(prompt_ids)
        ids = torch.tensor([prompt_ids], device=self.lm.device).expand(rows, length)
        steering = RowSteering(self.steering.blocks, rows)
        for row, plan in enumerate(plans):
            steering.assign(row, plan)
        cache = PrefixCache() if prefix is None else prefix  # a Cache is falsy while it has no layer list
        with self.kernels.applied():
            logits = read_blocks(self.lean, ids, steering, cache, self.special_ids)
        return logits.float(), steering.records(), cache

    def step_rows(self) -> int:
        """How many rows (from row 0) the next step computes."""
        if not self.occupied_only:
            return self.rows
        free = set(self.free)
        return max((row + 1 for row in range(self.rows) if row not in free), default=1)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step: logits [step_rows(), V] (float32) of each row's next token.

        On a GPU the step is a CUDA graph, captured once per steering structure and replayed: the inputs,
        positions, cache and steering tensors it reads are updated in place between steps.
        """
        if self.plan.graphs:
            logits = self._replay()
        else:
            logits = self._forward(self.step_rows())
        self.positions += self._advancing
        return logits

    def attended_span(self, count: int) -> int:
        """Positions the next step over `count` rows attends to: all, or, when occupied_only, the rows' longest
        context rounded up to SPAN_STEP (masked zeros beyond a row's own context add nothing)."""
        if not self.occupied_only:
            return self.length
        longest = int(self.positions[:count].max()) + 1
        return min(self.length, -(-longest // SPAN_STEP) * SPAN_STEP)

    def _forward(
        self, count: int | None = None, span: int | None = None, lean: bool | None = None
    ) -> torch.Tensor:
        """The model over rows [0, count) (default: all), at each row's position, attending to positions
        [0, span) (default: attended_span), through the lean step or the modules (default: lean if it can)."""
        count = self.rows if count is None else count
        span = self.attended_span(count) if span is None else span
        positions = self.positions[:count].unsqueeze(1)
        self.cache.write_positions = positions
        self.cache.span = span
        mask = (self._span[:span].unsqueeze(0) <= positions).view(count, 1, 1, span)
        inputs = self.inputs[:count].unsqueeze(1)
        self.steering.special_mask = torch.isin(inputs, self.special_ids)
        if lean is None:
            lean = self.lean_usable()
        if lean:
            with self.kernels.applied():
                self.steering.begin()
                logits = self.lean(inputs, positions, self.cache, mask, self.steering)
            return logits[:, -1, :].float()
        with slot_attention(self.lm.model), self.kernels.applied(), self.steering.attached():
            logits = model_forward(
                self.lm.model,
                inputs,
                self.cache,
                logits_to_keep=1,
                position_ids=positions,
                attention_mask=mask,
            )
        return logits[:, -1, :].float()

    def _replay(self) -> torch.Tensor:
        self.steering.prepare()
        structure = self.steering.structure
        if structure.captured is None:
            structure.captured = self._capture()
        graph, logits, gathered = structure.captured
        graph.replay()
        self.steering.gathered = gathered
        return logits

    def _capture(self):
        """Warm up on a side stream (the step is idempotent: it rewrites the same cache entries), then capture."""
        side = torch.cuda.Stream(device=self.lm.device)
        side.wait_stream(torch.cuda.current_stream(self.lm.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(self.lm.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._forward()
        return graph, logits, dict(self.steering.gathered)

    @torch.inference_mode()
    def _decide(self) -> StepPlan:
        """The batch's StepPlan, decided once per model, batch shape and policy (then kept): probe steps on
        random tokens at position 0 of the still empty batch (its cache rows are cleared again before any run
        writes a prompt):
        - the lean step's logits against the module path's (within TOLERANCE of the largest logit);
        - (CPU, with row-invariant linears) whole steps at every row count and attended span against a full
          one, bit for bit: then steps may skip free rows and unused positions."""
        by_shape = _PLANS.setdefault(self.lm.model, {})
        key = (self.rows, self.length, self.policy)
        if key not in by_shape:
            generator = torch.Generator().manual_seed(0)
            vocabulary = self.lm.model.get_input_embeddings().num_embeddings
            tokens = torch.randint(vocabulary, (self.rows,), generator=generator).to(self.lm.device)
            self.inputs.copy_(tokens)
            plan = decide(
                self.policy,
                self.rows,
                self.length,
                self.lm.device,
                self.kernels,
                lean_supported=self.lean is not None,
                lean_matches=self._lean_matches,
                rows_invariant=self._rows_invariant,
                graphs_enabled=use_cuda_graphs(self.lm.device),
            )
            self.inputs.zero_()
            for layer in self.cache.keys:
                self.cache.keys[layer].zero_()
                self.cache.values[layer].zero_()
            logger.info("Step plan for %s: %s", self.lm.source, plan.describe())
            by_shape[key] = plan
        return by_shape[key]

    def _lean_matches(self) -> bool:
        modules = self._forward(self.rows, self.length, lean=False)
        lean = self._forward(self.rows, self.length, lean=True)
        tolerance = TOLERANCE.get(self.lm.dtype, 1e-2) * float(modules.abs().max())
        return bool((lean - modules).abs().max() <= tolerance)

    def _rows_invariant(self, lean: bool) -> bool:
        full = self._forward(self.rows, self.length, lean)
        spans = range(SPAN_STEP, self.length, SPAN_STEP)
        return all(
            torch.equal(self._forward(count, self.length, lean), full[:count])
            for count in range(1, self.rows)
        ) and all(torch.equal(self._forward(1, span, lean), full[:1]) for span in spans)


@torch.inference_mode()
def teacher_forced(
    lean: LeanStep, input_ids: torch.Tensor, steering: RowSteering, keep: int
) -> tuple[torch.Tensor, SlotCache]:
    """input_ids [rows, seq] read from position 0 (causal) through the lean step: the logits [rows, keep, V]
    of the last `keep` positions, and the SlotCache of their keys and values."""
    rows, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(rows, length)
    cache = SlotCache(rows, length)
    cache.write_positions = positions
    causal = positions[0].unsqueeze(0) <= positions[0].unsqueeze(1)  # [query, key]
    mask = causal.view(1, 1, length, length).expand(rows, 1, length, length)
    steering.begin()
    return lean(input_ids, positions, cache, mask, steering, keep=keep), cache


def read_blocks(
    lean: LeanStep,
    input_ids: torch.Tensor,
    steering: RowSteering,
    cache: PrefixCache,
    special_ids: torch.Tensor,
) -> torch.Tensor:
    """input_ids [rows, seq] read through the lean step from position cache.length on, one PREFILL_BLOCK-aligned
    block per forward (each attending to the cache and its own causal part): the last position's logits
    [rows, V]. The blocks' boundaries depend only on absolute positions, so a block's numbers do not depend on
    where the cache came from."""
    rows, length = input_ids.shape
    start = cache.length
    if start >= length:
        raise ValueError(f"nothing to read: the cache already holds {start} of {length} positions")
    for block_start in range(start, length, PREFILL_BLOCK):
        block_end = min(length, (block_start // PREFILL_BLOCK + 1) * PREFILL_BLOCK)
        ids = input_ids[:, block_start:block_end]
        positions = torch.arange(block_start, block_end, device=ids.device).expand(rows, -1)
        keys = torch.arange(block_end, device=ids.device)
        mask = (keys.unsqueeze(0) <= positions[0].unsqueeze(1)).view(1, 1, block_end - block_start, block_end)
        steering.special_mask = torch.isin(ids, special_ids)
        steering.begin()
        logits = lean(ids, positions, cache, mask.expand(rows, 1, -1, -1), steering, keep=1)
    return logits[:, -1, :]


def prefix_length(read: int) -> int:
    """Of a prompt of `read` positions, the positions in full blocks: those a longer prompt that starts with it
    may reuse (read_blocks)."""
    return read // PREFILL_BLOCK * PREFILL_BLOCK


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(rows, length, policy): StepPlan}
