"""Which kernel gives other bits on another CPU under run_reproducibly? Fingerprints to compare between machines.

`train_sae --demo` trains in run_reproducibly's process (MKL_CBWR=COMPATIBLE, ATEN_CPU_CAPABILITY=avx2, 2 threads)
so that its weights would be the same on every CPU; on this machine kind they are not (an Intel Xeon with AMX and
an AMD EPYC write different bytes, see steering_app/demo/README.md). This script runs, in that same process, each
kind of kernel the demo's training calls on fixed inputs (MKL's sgemm, batched sgemm, sgemv and sdot; ATen's
softmax, norms, reductions and random fills; embedding_bag; topk), then the demo model's weights (each machine
dequantizes the GGUF itself) and its blocks on one packed batch
of the shipped corpus and three steps of the small demo training, and prints a sha256 prefix of each result.

    .venv/bin/python bench/reproducible_kernels.py > fingerprints.json

Run it on two CPUs and compare the JSON: the first kernel whose print differs is where the bits part. The prints
of every machine it has run on are kept in bench/reproducible_kernels.json, keyed by `lscpu`'s model name.
"""

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS = 4000  # the small demo training of tests/steering/test_train_sae.py
SEQUENCES = 4  # of 128 tokens, for the block-by-block prints


def fingerprint(tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def kernel_prints() -> dict:
    """One print per kernel kind, on inputs from a seeded generator (its own print first)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(512, 576, generator=generator)
    b = torch.randn(1536, 576, generator=generator)
    v = torch.randn(576, generator=generator)
    q = torch.randn(9, 128, 64, generator=generator)
    indices = torch.randint(0, 1536, (512, 16), generator=generator)
    weights = torch.rand(512, 16, generator=generator)
    return {
        "randn": fingerprint(a),
        "randperm": fingerprint(torch.randperm(100_000, generator=generator)),
        "sgemm F.linear": fingerprint(F.linear(a, b)),
        "sgemm addmm": fingerprint(torch.addmm(v[:512], b[:512], a.t())),
        "sgemm batched": fingerprint(q @ q.transpose(1, 2)),
        "sgemv": fingerprint(b @ v),
        "sdot": fingerprint(torch.stack([row @ v for row in a[:64]])),
        "softmax": fingerprint(torch.softmax(q, dim=-1)),
        "rms norm": fingerprint(a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5)),
        "silu": fingerprint(F.silu(a)),
        "exp": fingerprint(torch.exp(a)),
        "sum": fingerprint(a.sum(dim=0)),
        "norm": fingerprint(b.norm(dim=1)),
        "embedding_bag": fingerprint(F.embedding_bag(indices, b, per_sample_weights=weights, mode="sum")),
        "topk": fingerprint(F.linear(a, b).topk(16, dim=-1, sorted=False)[1].sort(dim=-1)[0]),
    }


def model_prints() -> dict:
    """The demo model's hidden states after each block up to the demo's layer, on the shipped corpus's first
    sequences as collect_activations packs them."""
    import torch

    from steering_app.engine import demo
    from steering_app.engine.layers import block_hidden, decoder_blocks
    from steering_app.engine.loader import load_model
    from steering_app.engine.training.activations import _packed_sequences
    from steering_app.engine.training.corpus import read_token_ids, token_documents

    lm = load_model(demo.DEMO_MODEL)
    documents = token_documents(read_token_ids(demo.DEMO_IDS), lm.tokenizer.eos_token_id)
    sequences = _packed_sequences(lm.tokenizer, documents, 128, lm.tokenizer.eos_token_id)
    ids = torch.tensor([next(sequences) for _ in range(SEQUENCES)])
    weights = hashlib.sha256()  # the dequantized GGUF as loaded: each machine makes its own copy
    for tensor in lm.model.state_dict().values():
        weights.update(tensor.contiguous().numpy().tobytes())
    prints, handles = {"model weights": weights.hexdigest()[:16]}, []
    blocks = decoder_blocks(lm.model)
    for layer in range(demo.DEMO_LAYER + 1):

        def hook(_module, _inputs, output, layer=layer):
            prints[f"block {layer}"] = fingerprint(block_hidden(output))

        handles.append(blocks[layer].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            embeddings = lm.model.get_input_embeddings()(ids)
            prints["embeddings"] = fingerprint(embeddings)
            lm.model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return prints


def training_prints(work: Path) -> dict:
    """The small demo training: its activations, then its weights after 1 and after 3 epochs (a step each)."""
    import torch

    from steering_app.engine import demo
    from steering_app.engine.loader import load_model
    from steering_app.engine.training import TrainConfig, collect_activations, train_sae
    from steering_app.engine.training.corpus import read_token_ids, token_documents

    lm = load_model(demo.DEMO_MODEL)
    documents = token_documents(read_token_ids(demo.DEMO_IDS), lm.tokenizer.eos_token_id)
    activations = collect_activations(
        lm.model, lm.tokenizer, documents, demo.DEMO_LAYER, max_tokens=TOKENS, progress=False
    )
    prints = {"activations": fingerprint(activations.acts)}
    for epochs in (1, 3):
        config = TrainConfig(d_sae=256, k=16, epochs=epochs, seed=0)
        sae = train_sae(activations.acts, config, progress=False).sae
        prints[f"weights after {epochs} epoch(s)"] = fingerprint(
            torch.cat([sae.W_enc.flatten(), sae.W_dec.flatten(), sae.b_enc, sae.b_dec])
        )
    return prints


def all_prints(work: Path) -> dict:
    import torch

    mkl = next(
        (line.strip(" -") for line in torch.__config__.show().splitlines() if "Math Kernel" in line), ""
    )
    return {
        "torch": f"{torch.__version__} ({torch.version.git_version[:12]})",
        "mkl": mkl,
        "threads": torch.get_num_threads(),
        "environment": {name: os.environ.get(name) for name in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")},
        **kernel_prints(),
        **model_prints(),
        **training_prints(work),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    import tempfile

    from steering_app import engine_config
    from steering_app.engine.training.reproducible import run_reproducibly

    engine_config.configure(data_dir=Path(os.environ.get("STEERLAB_DATA_DIR", "var")))
    with tempfile.TemporaryDirectory() as work:
        prints = run_reproducibly(all_prints, Path(work))
    print(json.dumps({"cpu": cpu_model(), **prints}, indent=1))
