"""An experiment's outputs as files, one row per output: CSV for spreadsheets, JSON Lines for scripts.

Both formats have the same columns (export_rows). In CSV, a text cell that starts with = + - @, a tab or a
carriage return gets a leading apostrophe: a spreadsheet would otherwise run a generated text such as
'=HYPERLINK(...)' as a formula (OWASP, "CSV Injection"). Numbers are written as they are, and JSON Lines
holds every value unchanged. The strength-0 control has no comparison metrics: kl_divergence and
perplexity_delta are empty there.
"""

import csv
import io
import json
from collections.abc import Iterator

from steering_app import experiments
from steering_app.models import Experiment

# Fields of experiments.result_rows taken as they are.
OUTPUT_FIELDS = (
    "prompt_index",
    "prompt",
    "seed",
    "strength",
    "text",
    "score",
    "concept",
    "fluency",
    "relevance",
)
# The raw readings behind the scores (engine/analysis/scores.py) and the run's comparison metrics of each output.
SCORE_READINGS = ("concept_sae", "concept_semantic", "perplexity_log_ratio", "repetition", "relevance_cosine")
METRICS = ("kl_divergence", "perplexity_delta")
COLUMNS = (
    "experiment_id",
    "condition",
    "features",
    *OUTPUT_FIELDS,
    *SCORE_READINGS,
    *METRICS,
    "run_id",
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def export_rows(experiment: Experiment) -> Iterator[dict]:
    """Every stored output as {column: value}, in COLUMNS' order."""
    features = [features_text(condition["features"]) for condition in experiment.conditions]
    for row in experiments.result_rows(experiment):
        yield {
            "experiment_id": experiment.pk,
            "condition": row["condition"],
            "features": features[row["condition"]],
            **{name: row[name] for name in OUTPUT_FIELDS},
            **{name: row["scores"].get(name) for name in SCORE_READINGS},
            **{name: row["metrics"].get(name) for name in METRICS},
            "run_id": row["run_id"],
        }


def features_text(features: list[dict]) -> str:
    """[{feature_id: 1681, coefficient: 2}, {feature_id: 12, coefficient: 1}] -> '1681:2.0;12:1.0'."""
    return ";".join(f"{feature['feature_id']}:{float(feature['coefficient'])!r}" for feature in features)


def csv_text(experiment: Experiment) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in export_rows(experiment):
        writer.writerow({name: formula_safe(value) for name, value in row.items()})
    return out.getvalue()


def formula_safe(value: object) -> object:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def jsonl_text(experiment: Experiment) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in export_rows(experiment))


def filename(experiment: Experiment, extension: str) -> str:
    return f"experiment-{experiment.pk}-results.{extension}"
