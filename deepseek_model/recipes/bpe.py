"""Byte-level BPE tokenizer training (the `tokenizers` library) for a recipe's corpus.

Byte-level: every UTF-8 byte has a symbol, the pre-tokenizer keeps all whitespace, so
`decode(encode(text)) == text` for any text (nothing is dropped that would flatter bits/byte).
The DeepSeek special tokens take ids 0 (BOS) and 1 (EOS), then the chat-role tokens.
"""

from __future__ import annotations

import os
from typing import Iterable

from deepseek_model.tokenizer import (ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, TOKENIZER_FILE, USER_TOKEN,
                                      write_tokenizer_config)

SPECIALS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)  # ids 0, 1, 2, 3
MIN_FREQUENCY = 2  # a merge must occur at least this often in the training texts


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, model_max_length: int) -> str:
    """Train a byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json.

    Args:
        texts: training documents (held-out text must not be among them).
        vocab_size: total vocabulary, special tokens and the 256 byte symbols included.
        out_dir: existing directory to write into.
        model_max_length: context length recorded in tokenizer_config.json.

    Returns:
        The path of tokenizer.json.

    Raises:
        ValueError: vocab_size too small for the byte alphabet and special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    base = len(SPECIALS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size must be >= {base} (special tokens + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=MIN_FREQUENCY, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1",
                                                       special_tokens=[(BOS_TOKEN, 0)])
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise AssertionError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    path = os.path.join(os.fspath(out_dir), TOKENIZER_FILE)
    tok.save(path)
    write_tokenizer_config(out_dir, model_max_length)
    return path
