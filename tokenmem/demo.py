"""``tokenmem demo``: the memory at work on a small local Llama-architecture model.

Until the project ships a trained language model, the demo builds a small Llama (random weights,
fixed seed) and a byte-level BPE tokenizer trained on a Python standard-library file, saves both with
``save_pretrained`` under ``~/.cache/tokenmem/demo-llama`` and loads them back with the real
``from_pretrained``. Its generated text is meaningless (the weights are random); what the demo shows
is the memory: tokens seen vs held, KV bytes, decode speed, and which tokens each evictor kept.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

DEMO_DIR = Path(os.environ.get("TOKENMEM_CACHE", Path.home() / ".cache" / "tokenmem")) / "demo-llama"
PROMPT_MODULE = "textwrap"


def _prompt_text() -> str:
    import importlib
    import inspect

    return inspect.getsource(importlib.import_module(PROMPT_MODULE))


def train_byte_bpe(texts, vocab_size: int, individual_digits: bool = False):
    """A byte-level BPE tokenizer trained offline on ``texts`` (specials ``<pad>``, ``<s>``, ``</s>`` get
    ids 0, 1, 2), as a ``transformers`` fast tokenizer. ``individual_digits`` splits every digit into its own
    token (numbers are then copied digit by digit, which small models learn far more easily)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_demo_model(path: Path = DEMO_DIR) -> Path:
    """Create (once) the demo model + tokenizer at ``path``; deterministic for a given Python version."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_byte_bpe([_prompt_text()], vocab_size=2048)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(model_path: str | None = None, max_new_tokens: int = 48) -> int:
    from tokenmem.adapters.text import TextAdapter

    path = Path(model_path) if model_path else build_demo_model()
    adapter = TextAdapter.from_pretrained(str(path), dtype=torch.float32)
    adapter.model.generation_config.eos_token_id = None  # random weights: always decode the full length
    prompt = _prompt_text()
    n_prompt = adapter.encode(prompt)["input_ids"].shape[1]
    print(f"model: {path} ({sum(p.numel() for p in adapter.model.parameters()) / 1e6:.1f} M params, "
          f"{'random weights: the text is meaningless, the memory is the point' if model_path is None else 'local'})")
    print(f"prompt: source of the stdlib module `{PROMPT_MODULE}` ({n_prompt} tokens), {max_new_tokens} new tokens")
    budget = 256
    print("\n| evictor | budget | held/layer | KV MiB | ms/token | separators among kept | first kept positions |")
    print("|---|---|---|---|---|---|---|")
    for evictor in ("full", "recent", "sink", "separator", "h2o"):
        b = None if evictor == "full" else budget
        start = time.perf_counter()
        result = adapter.generate(prompt, evictor=evictor, budget=b, interval=32, max_new_tokens=max_new_tokens)
        elapsed = time.perf_counter() - start
        stats = result.memory.stats()
        meta = result.memory.layers[-1].meta
        seps = meta.is_separator[0, 0].float().mean().item()
        first = meta.position[0, 0, :6].tolist()
        print(f"| {evictor} | {b or 'all'} | {stats['held'][0]} | {stats['kv_bytes'] / 2**20:.2f} | "
              f"{1000 * elapsed / (n_prompt + max_new_tokens):.2f}* | {100 * seps:.0f}% | {first} |")
    print("\n* wall time of prefill + decode divided by all tokens (prefill dominates on this CPU);"
          " see benchmarks/decode.py for per-token decode speed.")
    print("\nlast generation (h2o):", repr(result.texts[0][:120]))
    return 0
