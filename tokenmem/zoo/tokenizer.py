"""The shipped language model's tokenizer: byte-level BPE (8,192 entries) trained on the corpus's train split,
with every digit a token of its own."""

from __future__ import annotations

from .corpus import iter_files

VOCAB_SIZE = 8192


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    from ..demo import train_byte_bpe

    files = iter_files(split="train")
    tok = train_byte_bpe((f.text for f in files), vocab_size=vocab_size, individual_digits=True)
    tok.model_max_length = 2048
    return tok
