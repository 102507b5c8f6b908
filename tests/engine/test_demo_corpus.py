"""The shipped demo corpus ids are the tokens the demo table was measured on.

Calibrating the demo SAE on every one of them reproduces steering_app/demo/features.json (measured once over all
333,404 tokens: every max activation within 1e-4, see the demo README), which takes minutes. Here, in seconds:
for the 50 most frequent features, the table's strongest example is found in the ids, and the SAE reads the
table's max activation at that token again.
"""

import json
import re

import pytest
import torch

from steering_app.engine.demo import DEMO_CHECKPOINT, DEMO_FEATURES, DEMO_IDS, DEMO_LAYER
from steering_app.engine.layers import block_output
from steering_app.engine.saes.sae import load_sae
from steering_app.engine.training import corpus

# describe_features wrote each example with these (its defaults): the same function finds it again.
from steering_app.engine.training.describe import _context, _Decoder

pytestmark = pytest.mark.slow

SEQ_LEN = 128  # calibrate_features and train_sae pack the corpus into rows of this many tokens
TOP_FREQUENT = 50
TOLERANCE = 0.001  # the criterion is 10%; they agree to about 1e-4


def strongest_example(feature: dict) -> tuple[str, str]:
    """(the example's text as describe_features wrote it, its marked token) of the feature's strongest."""
    text = feature["examples"][0].rsplit(" (", 1)[0]
    return text, text.split("«", 1)[1].split("»", 1)[0]


def find(rows: list[list[int]], decode: _Decoder, wanted: dict[int, tuple[str, str]]) -> dict[int, list]:
    """feature index -> every (row, position) whose context is its strongest example's (a text may repeat)."""
    tokens = {token for _, token in wanted.values()}
    found: dict[int, list] = {}
    for r, row in enumerate(rows):
        for pos, token_id in enumerate(row):
            marked = marked_form(decode(token_id))
            if marked not in tokens:
                continue
            for index, (text, token) in wanted.items():
                if marked == token and _context(row, pos, decode, 12, 3) == text:
                    found.setdefault(index, []).append((r, pos))
    return found


def marked_form(token: str) -> str:
    """A token as it stands between « and » in an example, whose white space runs are single spaces."""
    return re.sub(r"\s+", " ", token)


def block_outputs_of_rows(lm, rows: list[list[int]], layer: int) -> list[torch.Tensor]:
    """The output of block `layer` at every position of each row, [len(row), hidden]: each row its own sequence,
    rows of one length in one batch, as collect_activations read the packed corpus, and the forward stopped after
    the block (layers.block_output: the blocks above it and the head would change nothing here)."""
    outputs = {}
    for length in {len(row) for row in rows}:
        batch = [i for i, row in enumerate(rows) if len(row) == length]
        ids = torch.tensor([rows[i] for i in batch], device=lm.device)
        outputs.update(zip(batch, block_output(lm.model, ids, layer)))
    return [outputs[i] for i in range(len(rows))]


def test_the_shipped_ids_hold_every_strongest_activation_of_the_demo_tables_most_frequent_features(smollm2):
    table = json.loads(DEMO_FEATURES.read_text())
    most_frequent = sorted(table, key=lambda entry: -entry["activation_frequency"])[:TOP_FREQUENT]
    ids = corpus.read_token_ids(DEMO_IDS).tolist()
    rows = [ids[start : start + SEQ_LEN] for start in range(0, len(ids), SEQ_LEN)]

    found = find(
        rows,
        _Decoder(smollm2.tokenizer),
        {entry["index"]: strongest_example(entry) for entry in most_frequent},
    )
    assert sorted(found) == sorted(entry["index"] for entry in most_frequent)

    windows = sorted({row for places in found.values() for row, _ in places})
    # Each window read as its own sequence, as when the corpus was packed into rows.
    hidden = block_outputs_of_rows(smollm2, [rows[row] for row in windows], DEMO_LAYER)
    sae = load_sae(DEMO_CHECKPOINT, dtype=torch.float32)
    ratios = {}
    for entry in most_frequent:
        # The corpus's activations are kept in float16 (training.activations), as the table read them.
        activations = torch.stack([hidden[windows.index(row)][pos] for row, pos in found[entry["index"]]])
        strongest = sae.encode(activations.half().float())[:, entry["index"]].max()
        ratios[entry["index"]] = float(strongest) / entry["max_activation"]
    print(
        f"read again / demo table's max activation, top {TOP_FREQUENT}: {min(ratios.values()):.4f}..{max(ratios.values()):.4f}"
    )
    assert all(abs(ratio - 1) <= TOLERANCE for ratio in ratios.values()), ratios
