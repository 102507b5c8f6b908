"""model_files reads what the panel needs from a model's files, without torch: here against gguf's own reader."""

from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFWriter

from steering_app.model_files import DEMO_MODEL, gguf_metadata_keys, has_chat_template, resolve_source


def test_it_reads_the_demo_ggufs_metadata_keys_past_its_vocabulary():
    keys = gguf_metadata_keys(Path(resolve_source(DEMO_MODEL)))
    # The chat template comes after the tokenizer's 49,152 tokens, scores and types (gguf's reader takes seconds
    # to build them; the other tests compare with it on small files).
    assert keys.index("tokenizer.ggml.tokens") < keys.index("tokenizer.chat_template")
    assert len(keys) == len(set(keys)) == 33 and "general.architecture" in keys
    assert has_chat_template(DEMO_MODEL)


@pytest.mark.parametrize("template", [None, "{{ messages }}"])
def test_it_finds_a_chat_template_after_arrays_of_every_kind(tmp_path, template):
    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list(["<s>", "hello", "wörld"])  # an array of strings
    writer.add_token_scores([0.0, -1.5, -2.5])  # an array of floats
    writer.add_uint32("llama.context_length", 2048)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    keys = gguf_metadata_keys(path)
    assert keys == [name for name in GGUFReader(path).fields if not name.startswith("GGUF.")]
    assert has_chat_template(str(path)) is (template is not None)


def test_a_file_that_is_not_gguf_has_no_chat_template(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all, just bytes" * 4)
    with pytest.raises(ValueError, match="not a little-endian GGUF"):
        gguf_metadata_keys(path)
    assert has_chat_template(str(path)) is False
