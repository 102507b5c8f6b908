"""TopK SAE training, activation collection, feature descriptions and the corpus readers, on a tiny
random GPT-2 with a byte-level BPE tokenizer trained here (no downloads, a few seconds)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from steering_app.engine import training
from steering_app.engine.layers import decoder_blocks
from steering_app.engine.saes.sae import load_sae
from steering_app.engine.training import corpus

WORDS = [
    "rain",
    "sun",
    "cloud",
    "storm",
    "river",
    "tree",
    "stone",
    "bread",
    "cheese",
    "music",
    "guitar",
    "dance",
]
EOT = "<|endoftext|>"


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "." for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(sentences(200, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT, bos_token=EOT, pad_token=EOT)


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


SMALL = training.TrainConfig(d_sae=64, k=4, batch_size=512, epochs=10, lr=3e-3, dead_after_tokens=2000)


def test_it_collects_block_outputs_without_special_tokens_and_stops_after_the_block(gpt2, tokenizer):
    texts = sentences(100)
    later_calls = []
    handle = decoder_blocks(gpt2)[2].register_forward_hook(lambda *args: later_calls.append(1))
    try:
        acts = training.collect_activations(
            gpt2, tokenizer, texts, 1, max_tokens=600, seq_len=16, batch_size=4, progress=False
        )
    finally:
        handle.remove()

    assert later_calls == []
    assert acts.acts.shape == (600, 32) and acts.acts.dtype == torch.float16
    kept_ids = acts.token_ids.flatten()[acts.positions]
    assert tokenizer.eos_token_id not in kept_ids.tolist()
    # Row i of the activations is the block-1 output at the token positions[i] names (batches of 4
    # sequences of 16 tokens: rows from several batches).
    for i in (5, 100, 599):
        row, pos = divmod(int(acts.positions[i]), 16)
        expected = gpt2(acts.token_ids[row : row + 1], output_hidden_states=True).hidden_states[2][0, pos]
        assert torch.allclose(acts.acts[i].float(), expected, atol=1e-2, rtol=1e-2)


def test_it_refuses_a_layer_the_model_does_not_have(gpt2, tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        training.collect_activations(gpt2, tokenizer, sentences(5), 4, max_tokens=10, progress=False)


def test_it_trains_writes_a_checkpoint_load_sae_reads_back_and_describes_features(gpt2, tokenizer, tmp_path):
    steps = []
    run = training.train_from_texts(
        gpt2,
        tokenizer,
        sentences(400),
        1,
        tmp_path / "sae",
        tokens=4000,
        config=SMALL,
        model_name="tiny-gpt2",
        dataset="sentences",
        features_path=tmp_path / "features.json",
        progress=False,
        on_step=steps.append,
    )

    assert steps and steps[-1]["step"] == steps[-1]["total_steps"]
    assert {"tokens", "loss", "explained_variance"} <= set(steps[-1])
    sae = load_sae(tmp_path / "sae")
    assert (sae.architecture, sae.k, sae.d_in, sae.d_sae, sae.apply_b_dec_to_input) == (
        "topk",
        4,
        32,
        64,
        True,
    )
    assert sae.hook_layer == 1 and sae.cfg["normalize_activations"] == "none"
    metadata = sae.cfg["metadata"]
    assert metadata["model_name"] == "tiny-gpt2" and metadata["dataset"] == "sentences"
    assert metadata["tokens"] == 4000 == run.stats["tokens"]
    assert 0.4 < metadata["explained_variance"] <= 1 and 0 < metadata["l0"] <= 4
    assert 0 <= metadata["dead_fraction"] <= 1 and metadata["label_coverage"] > 0.5
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-4)

    features = json.loads((tmp_path / "features.json").read_text())
    assert features == run.features and [f["index"] for f in features] == list(range(64))
    for feature in features:
        assert {"label", "description", "max_activation", "activation_frequency", "top_tokens"} <= set(
            feature
        )
        assert 0 <= feature["activation_frequency"] <= 1
    live = [f for f in features if f["max_activation"] > 0]
    assert live and all(f["label"] and f["top_tokens"] for f in live)
    # The strongest activation recorded is what the saved SAE gives on the collected activations.
    acts = training.collect_activations(gpt2, tokenizer, sentences(400), 1, max_tokens=4000, progress=False)
    observed = sae.encode(acts.acts.float()).max(dim=0).values
    recorded = torch.tensor([f["max_activation"] for f in features])
    assert torch.allclose(observed, recorded, atol=1e-3, rtol=1e-3)


def test_a_word_feature_is_labelled_with_its_word(tokenizer):
    """Hand-made activations: latent 0 fires on every "rain" token, so its label names rain."""
    ids = tokenizer(" ".join(sentences(80)), add_special_tokens=False)["input_ids"][:512]
    rain = tokenizer(" rain", add_special_tokens=False)["input_ids"]
    assert len(rain) == 1
    token_ids = torch.tensor(ids).reshape(4, 128)
    is_rain = (token_ids.flatten() == rain[0]).float()
    acts = torch.stack([is_rain * 5.0, 1 - is_rain], dim=1)  # d_in = 2: "rain" and "not rain"
    activations = training.Activations(
        acts=acts.half(), positions=torch.arange(512), token_ids=token_ids, layer=0
    )
    sae = training.TopKSAE(2, 2, 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    features = training.describe_features(
        training.to_saelens(sae, {}), activations, tokenizer, progress=False
    )

    assert features[0]["label"].startswith('"rain"')
    assert features[0]["top_tokens"] == ["rain"]
    assert features[0]["max_activation"] == 5.0
    assert features[0]["activation_frequency"] == pytest.approx(float(is_rain.mean()), abs=1e-6)
    assert "«" in features[0]["examples"][0] and "rain" in features[0]["description"]


def test_a_stop_request_raises_and_leaves_no_checkpoint(gpt2, tokenizer, tmp_path):
    checks = iter(range(1000))
    with pytest.raises(training.TrainingInterrupted):
        training.train_from_texts(
            gpt2,
            tokenizer,
            sentences(400),
            1,
            tmp_path / "sae",
            tokens=4000,
            config=SMALL,
            progress=False,
            stop=lambda: next(checks) >= 3,
        )
    assert not (tmp_path / "sae").exists()
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_during_training_propagates_and_leaves_no_checkpoint(gpt2, tokenizer, tmp_path):
    def interrupt(_info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train_from_texts(
            gpt2,
            tokenizer,
            sentences(400),
            1,
            tmp_path / "sae",
            tokens=4000,
            config=SMALL,
            progress=False,
            on_step=interrupt,
        )
    assert list(tmp_path.iterdir()) == []


def test_the_sparse_encoder_gradient_equals_the_dense_one():
    torch.manual_seed(0)
    sae = training.TopKSAE(16, 40, 5).double()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(64, 16, dtype=torch.float64)
    weights = torch.randn(64, 5, dtype=torch.float64)
    centered, pre = sae.dense_pre_acts(x)
    indices = pre.topk(5, dim=-1).indices
    (sae.selected(centered, pre, indices) * weights).sum().backward()
    sparse = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.b_dec)]
    sae.zero_grad()
    dense_pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    (torch.relu(dense_pre.gather(1, indices)) * weights).sum().backward()
    for got, expected in zip(sparse, (sae.W_enc.grad, sae.b_enc.grad, sae.b_dec.grad)):
        assert torch.allclose(got, expected)


def test_it_recovers_sparse_synthetic_data_with_few_dead_latents():
    torch.manual_seed(0)
    directions = torch.randn(48, 16)
    codes = torch.rand(6000, 48) * (torch.rand(6000, 48) < 0.06)
    acts = (codes @ directions).half()
    config = training.TrainConfig(d_sae=48, k=4, batch_size=500, epochs=10, lr=1e-2, dead_after_tokens=1000)
    result = training.train_sae(acts, config, progress=False)
    assert result.stats["dead_fraction"] <= 0.1
    assert result.stats["explained_variance"] > 0.75


def test_the_corpus_files_read_back_as_documents(tmp_path):
    documents = ["First document.\n\nIt has two paragraphs.", "Second one.", "Third\fwith a form feed."]
    path = corpus.write_corpus(tmp_path / "c.txt", documents)
    assert list(corpus.read_text_file(path)) == [documents[0], documents[1], "Third\nwith a form feed."]
    assert corpus.text_files(path) == [path]
    assert list(corpus.read_texts([path])) == list(corpus.read_text_file(path))

    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "b.txt").write_text("Bee.")
    (tmp_path / "dir" / "sub" / "a.md").write_text("Ay.")
    (tmp_path / "dir" / "skip.bin").write_text("no")
    assert corpus.text_files(tmp_path / "dir") == [
        tmp_path / "dir" / "b.txt",
        tmp_path / "dir" / "sub" / "a.md",
    ]
    assert list(corpus.read_texts(corpus.text_files(tmp_path / "dir"))) == ["Bee.", "Ay."]
    long = "\n\n".join(f"Paragraph {i} " + "x" * 90 for i in range(100))
    (tmp_path / "long.txt").write_text(long)
    chunks = list(corpus.read_text_file(tmp_path / "long.txt", max_chars=1000))
    assert len(chunks) > 5 and all(len(c) <= 1000 for c in chunks) and "\n\n".join(chunks) == long
    with pytest.raises(FileNotFoundError):
        corpus.text_files(tmp_path / "missing")
    (tmp_path / "no-text").mkdir()
    with pytest.raises(FileNotFoundError):
        corpus.text_files(tmp_path / "no-text")


def test_the_demo_prompts_are_seeded_and_cover_every_topic_first():
    prompts = corpus.demo_prompts(len(corpus.DEMO_TOPICS), seed=0)
    assert prompts == corpus.demo_prompts(len(corpus.DEMO_TOPICS), seed=0)
    assert prompts != corpus.demo_prompts(len(corpus.DEMO_TOPICS), seed=1)
    for topic in corpus.DEMO_TOPICS:
        assert sum(topic in prompt for prompt in prompts) >= 1
    assert len(set(corpus.demo_prompts(600))) == 600


def test_the_demo_corpus_is_reproducible(gpt2, tokenizer, tmp_path):
    kwargs = {
        "sampled_prompts": 4,
        "offline_tokens": 300,
        "max_new_tokens": 8,
        "batch_size": 2,
        "progress": False,
    }
    first = corpus.build_demo_corpus(gpt2, tokenizer, tmp_path / "a.txt", **kwargs)
    second = corpus.build_demo_corpus(gpt2, tokenizer, tmp_path / "b.txt", **kwargs)
    assert first.read_text() == second.read_text()
    documents = list(corpus.read_text_file(first))
    prompts = corpus.demo_prompts(4)
    assert sum(any(d.startswith(p) for d in documents) for p in prompts) == 4
    assert len(documents) > 4  # stdlib prose too


def test_corpus_token_ids_read_back_as_the_documents_they_were_made_of(gpt2, tokenizer, tmp_path):
    texts = [*sentences(40, seed=3), "", *sentences(40, seed=4)]
    path = corpus.write_token_ids(tmp_path / "ids.npy.xz", corpus.corpus_token_ids(tokenizer, texts))

    ids = corpus.read_token_ids(path)
    documents = list(corpus.token_documents(ids, tokenizer.eos_token_id))
    from_ids = training.collect_activations(gpt2, tokenizer, documents, 2, max_tokens=10_000, progress=False)
    from_texts = training.collect_activations(gpt2, tokenizer, texts, 2, max_tokens=10_000, progress=False)

    assert ids.dtype == "uint16" and len(documents) == 80
    assert documents[0] == tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert torch.equal(from_ids.token_ids, from_texts.token_ids)
    assert torch.equal(from_ids.acts, from_texts.acts) and from_ids.num_tokens > 0
    rewritten = corpus.write_token_ids(tmp_path / "again.npy.xz", ids)
    assert rewritten.read_bytes() == path.read_bytes()
