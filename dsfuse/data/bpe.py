"""A byte-level BPE text tokenizer trained on a run's captions with `tokenizers`, saved beside the run
(any text still encodes: unseen words fall back to bytes)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsfuse.errors import UsageError
from dsfuse.io import write_text


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` tokens at most (the 256 bytes, then merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_bpe(tokenizer: Tokenizer, path: Path) -> None:
    write_text(path, tokenizer.to_str())


def load_bpe(path: Path) -> Tokenizer:
    """The tokenizer saved at `path`; a missing or unreadable one is a UsageError naming it."""
    if not path.is_file():
        raise UsageError("the run's text tokenizer is missing", path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise UsageError(f"not a tokenizers JSON file ({str(e).splitlines()[0][:120]})", path) from None
