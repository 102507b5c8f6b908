"""Text sources for SAE training: plain-text files and directories, and the reproducible demo corpus.

The demo corpus is made by code, never downloaded: continuations sampled from the model itself over a
fixed, diverse list of prompts (seeded), plus prose that ships with the Python interpreter (stdlib
docstrings and the language reference topics). Sampling is seeded but its bits depend on the CPU (the
same seed writes other text on another machine), so the corpus made once ships as token ids
(write_token_ids), which every later run reads back (read_token_ids, token_documents).
"""

from __future__ import annotations

import ast
import io
import lzma
import os
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..demo import DEMO_OFFLINE_TOKENS, DEMO_PROMPTS, DEMO_SEED
from ..tokens import chat_text, pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
DOCUMENT_SEPARATOR = "\n\n\f\n\n"

# Everyday topics first: they give the feature space words that a user wants to steer towards.
DEMO_TOPICS = (
    "the weather",
    "a thunderstorm",
    "snow in winter",
    "a hot summer day",
    "the ocean",
    "sharks",
    "whales",
    "dolphins",
    "coral reefs",
    "fishing",
    "sailing",
    "a pirate ship",
    "mountains",
    "hiking",
    "camping",
    "forests",
    "volcanoes",
    "earthquakes",
    "deserts",
    "rivers",
    "gardening",
    "flowers",
    "roses",
    "trees",
    "farming",
    "cows",
    "horses",
    "chickens",
    "dogs",
    "cats",
    "birds",
    "bees and honey",
    "butterflies",
    "snakes",
    "lions",
    "elephants",
    "monkeys",
    "dinosaurs",
    "cooking pasta",
    "baking bread",
    "chocolate",
    "coffee",
    "tea",
    "pizza",
    "a birthday cake",
    "fruit",
    "vegetables",
    "cheese",
    "soup",
    "breakfast",
    "wine",
    "beer",
    "a restaurant",
    "football",
    "basketball",
    "tennis",
    "the Olympic Games",
    "swimming",
    "running a marathon",
    "chess",
    "cycling",
    "golf",
    "boxing",
    "music",
    "playing the guitar",
    "the piano",
    "jazz",
    "a rock concert",
    "singing",
    "dancing",
    "painting",
    "photography",
    "movies",
    "theatre",
    "poetry",
    "reading books",
    "libraries",
    "a fairy tale",
    "dragons",
    "magic and wizards",
    "ghosts",
    "a haunted house",
    "Halloween",
    "Christmas",
    "a wedding",
    "friendship",
    "love",
    "a family dinner",
    "children playing",
    "school",
    "a math exam",
    "university",
    "teachers",
    "space travel",
    "the Moon",
    "Mars",
    "stars and galaxies",
    "black holes",
    "rockets",
    "astronauts",
    "robots",
    "artificial intelligence",
    "computers",
    "the internet",
    "smartphones",
    "video games",
    "Python programming",
    "databases",
    "cybersecurity",
    "electricity",
    "solar energy",
    "climate change",
    "recycling",
    "cars",
    "trains",
    "airplanes",
    "bicycles",
    "a road trip",
    "traveling to Paris",
    "Japan",
    "Italy",
    "New York City",
    "London",
    "ancient Egypt",
    "the Roman Empire",
    "medieval castles",
    "knights",
    "World War II",
    "the French Revolution",
    "democracy",
    "elections",
    "the economy",
    "the stock market",
    "money",
    "banks",
    "taxes",
    "a small business",
    "a job interview",
    "medicine",
    "doctors and hospitals",
    "the human heart",
    "sleep",
    "exercise",
    "a cold and flu",
    "vaccines",
    "dentists",
    "chemistry",
    "physics",
    "biology",
    "DNA",
    "evolution",
    "mathematics",
    "prime numbers",
    "geometry",
    "the law",
    "a court trial",
    "the police",
    "a detective story",
    "a bank robbery",
    "fire fighters",
    "war and peace",
    "religion",
    "philosophy",
    "happiness",
    "sadness",
    "anger",
    "fear",
    "a rainy day",
    "a lost key",
    "a train station",
    "an old clock",
    "a lighthouse",
    "a village market",
    "fashion and clothes",
    "shoes",
    "houses",
    "furniture",
    "cleaning the kitchen",
    "a birthday party",
    "the news",
    "newspapers",
)

DEMO_TEMPLATES = (
    "Write a short paragraph about {topic}.",
    "Tell me a short story about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Write a news report about {topic}.",
    "Describe {topic} in vivid detail.",
    "Give me three interesting facts about {topic}.",
    "Write a short poem about {topic}.",
    "What should everyone know about {topic}?",
    "Write a diary entry about {topic}.",
    "Write a dialogue between two friends talking about {topic}.",
)

# Stdlib packages whose docstrings are mostly test fixtures, generated tables or GUI strings.
_SKIPPED_STDLIB = (
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "ensurepip",
    "turtledemo",
)


def demo_prompts(count: int, seed: int = 0) -> list[str]:
    """count prompts over DEMO_TOPICS x DEMO_TEMPLATES: every topic before any repeats, order seeded."""
    rng = random.Random(seed)
    pairs = [(topic, template) for template in DEMO_TEMPLATES for topic in DEMO_TOPICS]
    rng.shuffle(pairs)
    # Interleave so that the first len(DEMO_TOPICS) prompts cover each topic once.
    by_topic: dict[str, list[str]] = {}
    for topic, template in pairs:
        by_topic.setdefault(topic, []).append(template.format(topic=topic))
    rounds = [
        [prompts[i] for prompts in by_topic.values() if i < len(prompts)] for i in range(len(DEMO_TEMPLATES))
    ]
    ordered = [prompt for round_ in rounds for prompt in rng.sample(round_, len(round_))]
    return [ordered[i % len(ordered)] for i in range(count)]


def sample_texts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 50,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], object] | None = None,
) -> Iterator[str]:
    """Sampled chat answers of model to each prompt (the answer only), in order.

    dtype: sample from a copy of the model in this dtype (bfloat16 samples about a third faster on
    CPUs with AVX512-BF16, and its text reads as well); None samples from the model as it is. The
    text only feeds the corpus: what matters is that it is seeded.
    """
    device = next(model.parameters()).device
    sampler = model
    if dtype is not None and dtype != next(model.parameters()).dtype:
        import copy

        sampler = copy.deepcopy(model).to(dtype)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = pad_token_id(tokenizer, model)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            chats = [_chat(tokenizer, prompt) for prompt in batch]
            enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seed * 1_000_003 + start)
            with torch.inference_mode():
                out = sampler.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=1.0,
                    pad_token_id=pad_id,
                )
            for row in out[:, enc["input_ids"].shape[1] :]:
                yield tokenizer.decode(row, skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(batch))
    finally:
        tokenizer.padding_side = padding_side
        if sampler is not model:
            del sampler


def _chat(tokenizer, prompt: str) -> str:
    text = chat_text(tokenizer, prompt)
    return prompt + "\n" if text is None else text


def stdlib_texts(seed: int = 0) -> Iterator[str]:
    """The docstrings of the running Python's standard library and its language-reference topics.

    Sources (one stdlib module or one reference topic each) are visited in a seeded order and read
    lazily, so taking a few texts is cheap. Reproducible for one Python version; available on every
    machine that runs the project.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources: list[Path | str] = [
        path
        for path in sorted(stdlib.rglob("*.py"))
        if not any(part in _SKIPPED_STDLIB for part in path.relative_to(stdlib).parts)
    ]
    topics = _reference_topics()
    sources.extend(sorted(topics))
    random.Random(seed).shuffle(sources)
    for source in sources:
        if isinstance(source, Path):
            yield from _docstrings(source)
        else:
            yield from filter(_is_prose, _paragraph_chunks(topics[source]))


def _reference_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return topics


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            # One-liners are mostly "Return x." boilerplate and doctests are code: keep the prose.
            if doc and len(doc) >= 200 and _is_prose(doc):
                yield doc


def _is_prose(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    code = sum(1 for line in lines if line.startswith((">>>", "...", "$ ")))
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return code <= 0.1 * len(lines) and letters >= 0.85 * len(text)


def _paragraph_chunks(text: str, max_chars: int = 4000) -> Iterator[str]:
    """text cut at blank lines into pieces of at most about max_chars."""
    chunk: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if chunk and size + len(paragraph) > max_chars:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
        chunk.append(paragraph)
        size += len(paragraph) + 2
    if chunk:
        yield "\n\n".join(chunk)


def read_text_file(path: os.PathLike | str, max_chars: int = 4000) -> Iterator[str]:
    """Documents of a text file: a form feed line separates documents; long ones are cut at blank lines."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for document in text.split("\f"):
        yield from _paragraph_chunks(document, max_chars)


def text_files(path: os.PathLike | str, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """The files a corpus path names: a text file itself, or every text file under a directory (recursive,
    sorted by path)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"{path}: no text files ({', '.join(suffixes)})")
    return files


def read_texts(files: Iterable[os.PathLike | str]) -> Iterator[str]:
    """Documents of text files, one file after another."""
    for file in files:
        yield from read_text_file(file)


def write_corpus(path: os.PathLike | str, texts: Iterable[str]) -> Path:
    """Write documents to one text file that read_text_file reads back (form feed between documents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    with staging.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            if i:
                handle.write(DOCUMENT_SEPARATOR)
            handle.write(text.replace("\f", "\n"))
    staging.replace(path)
    return path


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> int:
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def build_demo_corpus(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: os.PathLike | str,
    *,
    sampled_prompts: int = DEMO_PROMPTS,
    offline_tokens: int = DEMO_OFFLINE_TOKENS,
    max_new_tokens: int = 128,
    batch_size: int = 50,
    seed: int = DEMO_SEED,
    sample_dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = True,
) -> Path:
    """Write the demo corpus to path: model samples over demo_prompts, then stdlib prose up to offline_tokens.

    The prompt is kept in front of its answer, so the topic words appear in the text.
    """
    from tqdm.auto import tqdm

    prompts = demo_prompts(sampled_prompts, seed)
    documents: list[str] = []
    with tqdm(total=len(prompts), desc="sampling demo corpus", unit="prompt", disable=not progress) as bar:
        answers = sample_texts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            dtype=sample_dtype,
            progress=bar.update,
        )
        for prompt, answer in zip(prompts, answers):
            if answer:
                documents.append(f"{prompt}\n\n{answer}")
    budget = offline_tokens
    for text in stdlib_texts(seed):
        if budget <= 0:
            break
        documents.append(text)
        budget -= len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Interleave the two sources so that any prefix of the corpus is a representative mix.
    random.Random(seed).shuffle(documents)
    return write_corpus(path, documents)


def corpus_token_ids(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> np.ndarray:
    """The documents' token ids, each document followed by EOS, as uint16: what collect_activations packs
    when it reads the texts themselves (token_documents gives the documents back)."""
    separator = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            stream.extend([*ids, separator])
    if max(stream, default=0) > np.iinfo(np.uint16).max:
        raise ValueError("token ids above 65535 do not fit uint16")
    return np.asarray(stream, dtype=np.uint16)


def write_token_ids(path: os.PathLike | str, ids: np.ndarray) -> Path:
    """ids as an xz-compressed .npy file (the same ids write the same bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, ids, allow_pickle=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    return path


def read_token_ids(path: os.PathLike | str) -> np.ndarray:
    return np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())), allow_pickle=False)


def token_documents(ids: np.ndarray, separator: int) -> Iterator[list[int]]:
    """The documents of a corpus_token_ids stream, as token id lists (collect_activations reads them as
    it reads texts, without tokenizing)."""
    ends = np.flatnonzero(ids == separator)
    start = 0
    for end in ends:
        if end > start:
            yield ids[start:end].tolist()
        start = end + 1
    if start < len(ids):
        yield ids[start:].tolist()
