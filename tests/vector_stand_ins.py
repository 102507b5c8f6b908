"""A stand-in for the model's forwards in tests of a steering vector's job: vectors that depend only on the
examples (their count), so storage, progress and the pages can be tested without weights."""

import torch

from steering_app.engine import loader, vectors


def fake_concept(name, description, positives, negatives, num_layers, hidden, best_layer=2):
    """A concept whose vectors are a function of the examples (their count), as make_concept's would be."""
    base = torch.arange(num_layers * hidden, dtype=torch.float32).reshape(num_layers, hidden)
    separation = [1.0 if layer == best_layer else 0.5 for layer in range(num_layers)]
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


def use_vector_engine(monkeypatch, num_layers: int, hidden: int) -> list[dict]:
    """load_model and make_concept stand-ins (progress reported at 0.5); returns the calls, recorded."""
    calls = []

    def make_concept(lm, name, description, positives, negatives, *, method, tokens, paired, on_progress):
        calls.append({"method": method, "tokens": tokens, "paired": paired, "positives": positives})
        on_progress(0.5)
        return fake_concept(name, description, positives, negatives, num_layers, hidden)

    lm = type("LM", (), {"num_layers": num_layers, "hidden_size": hidden})()
    monkeypatch.setattr(loader, "load_model", lambda source, **kw: lm)
    monkeypatch.setattr(vectors, "make_concept", make_concept)
    return calls
