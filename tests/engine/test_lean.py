"""The lean step: where it is taken, and its attention."""

import torch

from steering_app.engine.serving.scheduler import Scheduler
from steering_app.engine.serving.slots import grouped_attention, sdpa_attention


def test_the_fused_attention_computes_the_grouped_attention():
    """The lean step's GPU attention and the CPU one agree, queries of several tokens and per-row masks."""
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, seq, length, dim = 4, 9, 3, 3, 40, 16
    query = torch.randn(rows, heads, seq, dim, generator=generator)
    key = torch.randn(rows, kv_heads, length, dim, generator=generator)
    value = torch.randn(rows, kv_heads, length, dim, generator=generator)
    last = torch.tensor([5, 10, 36, 20])  # each row's last cached position before its queries
    mask = torch.arange(length).view(1, 1, 1, -1) <= (
        last.view(-1, 1, 1, 1) + torch.arange(seq).view(1, 1, -1, 1)
    )
    grouped, _ = grouped_attention(None, query, key, value, mask, scaling=dim**-0.5)
    fused, _ = sdpa_attention(None, query, key, value, mask, scaling=dim**-0.5)
    assert grouped.shape == fused.shape == (rows, seq, heads, dim)
    assert torch.allclose(grouped, fused, atol=1e-5)
    # a row attends to its own cache only: changing another row's keys changes nothing in it
    key[1:] = 0
    fused_again, _ = sdpa_attention(None, query, key, value, mask, scaling=dim**-0.5)
    assert torch.equal(fused_again[0], fused[0]) and not torch.equal(fused_again[1], fused[1])


def test_the_batch_takes_the_lean_step_only_for_a_supported_architecture(tiny):
    with tiny.lock:
        batch = Scheduler(tiny, 4, 32).batch
    expected = tiny.architecture == "LlamaForCausalLM"  # GPT-2's blocks differ: the module path
    assert (batch.lean is not None) == expected
