"""Text adapter: separators from a tokenizer, metadata of text tokens, generation through the adapter."""

import subprocess
import sys

import torch
from transformers import AutoTokenizer

import tokenmem
from tokenmem.adapters import TextAdapter, separator_ids
from tokenmem.adapters.text import SEPARATOR_TEXTS


def test_separator_ids_from_tokenizer(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = set(separator_ids(tok))
    for text in (".", ",", "?", "!", ";", ":", " ", "\t", "\n", " .", " ,"):
        encoded = tok.encode(text, add_special_tokens=False)
        if len(encoded) == 1:  # the text is one token in this vocabulary: it must be a separator
            assert encoded[0] in ids, repr(text)
    for i in ids:  # and every separator decodes to one of the separator texts (space marker allowed)
        text = tok.decode([i])
        assert text in SEPARATOR_TEXTS or text[1:] in SEPARATOR_TEXTS, repr(text)
    for word in ("def", "return", "fox", "a"):
        assert not set(tok.encode(word, add_special_tokens=False)) & ids
    assert not ids & set(tok.all_special_ids)


def test_text_metadata_and_separator_eviction(tiny_llama_dir):
    adapter = TextAdapter.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapter.model.generation_config.eos_token_id = None
    prompt = "Hello, world. How are you? Fine! Thanks; see: this is a test.\n" * 8
    result = adapter.generate(prompt, evictor="separator", budget=48, interval=4, max_new_tokens=12)
    memory = result.memory
    enc = adapter.encode(prompt)["input_ids"][0]
    meta = memory.layers[0].meta
    seps = set(adapter.separators)
    # the token ids recorded in the metadata are the prompt's (and generated) ids at those positions
    stream = result.sequences[0]
    for pos, tok in zip(meta.position[0, 0].tolist(), meta.token[0, 0].tolist()):
        assert tok == int(stream[pos])
        assert bool(tok in seps) == bool(meta.is_separator[0, 0][meta.position[0, 0] == pos].item())
    assert (meta.modality == tokenmem.MODALITIES["text"]).all()
    # beyond the 3 initial and the 12 recent tokens protected at the last eviction (n_recent=0.25 of 48),
    # only separators were kept (this prompt has more separators than the budget holds)
    positions = meta.position[0, 0]
    last_eviction_seen = memory.seen - memory.layers[0].since_evict
    middle = (positions >= 3) & (positions < last_eviction_seen - 12)
    assert middle.any() and meta.is_separator[0, 0][middle].all()
    assert len(enc) > 48


def test_cli_evictors_lists_every_registered_evictor():
    out = subprocess.run([sys.executable, "-m", "tokenmem.cli", "evictors"], capture_output=True, text=True, check=True)
    for name in tokenmem.list_evictors():
        assert name in out.stdout


def test_cli_generate_prints_text_and_summary(tiny_llama_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def add(a, b):\n    return a + b\n" * 10)
    out = subprocess.run(
        [sys.executable, "-m", "tokenmem.cli", "generate", "--model", tiny_llama_dir, "--prompt-file", str(prompt),
         "--evictor", "sink", "--budget", "32", "--max-new-tokens", "8"],
        capture_output=True, text=True, check=True)
    assert "memory: evictor=sink budget=32" in out.stdout
    assert "evictions=" in out.stdout


def test_cli_reports_bad_input(tmp_path, tiny_llama_dir):
    out = subprocess.run([sys.executable, "-m", "tokenmem.cli", "generate", "--model", tiny_llama_dir,
                          "--prompt-file", str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    out = subprocess.run([sys.executable, "-m", "tokenmem.cli", "generate", "--model", tiny_llama_dir,
                          "--prompt-file", str(prompt), "--evictor", "nope", "--budget", "8"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "registered evictors" in out.stderr


def test_chunked_prefill_then_generate_matches_one_shot(tiny_llama_dir):
    """Prefill in chunks, then generate continues from the last token: same tokens as one-shot prefill
    without eviction; with a budget the memory stays bounded during the prefill itself."""
    adapter = TextAdapter.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapter.model.generation_config.eos_token_id = None
    prompts = ["def add(a, b):\n    return a + b\n" * 12, "Hello, world. " * 9]
    one_shot = adapter.generate(prompts, max_new_tokens=16)
    chunked = adapter.generate(prompts, max_new_tokens=16, prefill_chunk=37)
    assert torch.equal(one_shot.sequences, chunked.sequences)
    held = []
    memory = adapter.memory("sink", budget=40, interval=8)
    original = memory.evict_layer

    def spy(layer, keep):
        original(layer, keep)
        held.append(layer.held)

    memory.evict_layer = spy
    enc = adapter.encode(prompts)
    from tokenmem.adapters import prefill
    with torch.no_grad():
        prefill(adapter.model, memory, enc["input_ids"], enc["attention_mask"], chunk=37)
    assert memory.seen == enc["input_ids"].shape[1] - 1
    assert held and max(held) <= 40 and memory.layers[0].capacity <= 2 * (40 + 37) + 64
