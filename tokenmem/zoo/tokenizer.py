"""Byte-level BPE tokenizers trained offline (:func:`train_byte_bpe`, also used by the video trainer and the
tests), and the shipped language model's tokenizer: 8,192 entries trained on the corpus's train split, with every
digit a token of its own (:func:`build_tokenizer`)."""

from __future__ import annotations

from .corpus import iter_files

VOCAB_SIZE = 8192


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


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    files = iter_files(split="train")
    tok = train_byte_bpe((f.text for f in files), vocab_size=vocab_size, individual_digits=True)
    tok.model_max_length = 2048
    return tok
