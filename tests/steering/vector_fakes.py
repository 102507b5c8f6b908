"""A stand-in for the model's forwards in the vector tests: a concept that depends only on the examples.
The fixtures that install it (fake_engine) are in conftest.py."""

import torch

from steering_app.engine import vectors


def fake_concept(name, description, positives, negatives, num_layers, hidden, best_layer=2):
    """A concept whose vectors are a function of the examples (their count), as make_concept's would be."""
    base = torch.arange(num_layers * hidden, dtype=torch.float32).reshape(num_layers, hidden)
    separation = [
        0.5 + 0.1 * (layer == best_layer) + 0.4 * (layer == best_layer) for layer in range(num_layers)
    ]
    return vectors.Concept(
        name=name,
        description=description,
        vectors=base / (1 + len(positives)),
        offsets=torch.zeros(num_layers),
        separation=separation,
        best_layer=best_layer,
        info={
            "method": "diffmean",
            "tokens": "all",
            "positives": len(positives),
            "negatives": len(negatives),
        },
    )
