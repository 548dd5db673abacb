"""Held-out evaluation: bits per byte of a causal LM over non-overlapping windows.

Each text is tokenized on its own (no BOS) and cut into consecutive windows of the trained context;
within a window, every token after the first is predicted from the tokens before it (no BOS is
inserted at window starts, so each window's first token is context only). The natural-log NLL of
all predicted tokens, converted to bits, is divided by the UTF-8 bytes those tokens decode to:

    bits/byte = Σ −ln p(token) / ln 2 / Σ bytes(token)

Bytes are counted per token id from the byte-level vocabulary, so the figure does not depend on the
tokenizer's vocabulary size and cannot be flattered by a tokenizer that drops bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from deepseek_model.tokenizer import byte_symbols

EVAL_BATCH = 16  # windows per forward

Forward = Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids → (B, T, V) logits


@dataclass(frozen=True)
class BitsPerByte:
    """One held-out measurement.

    Attributes:
        nll_nats: summed natural-log NLL of the predicted tokens.
        tokens: predicted tokens.
        bytes: UTF-8 bytes of the predicted tokens.
    """

    nll_nats: float
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        """NLL in bits per UTF-8 byte."""
        return self.nll_nats / math.log(2) / self.bytes

    @property
    def loss(self) -> float:
        """Mean NLL per predicted token (nats)."""
        return self.nll_nats / self.tokens


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(V,) int64: how many UTF-8 bytes each token id of a byte-level BPE tokenizer decodes to.

    Args:
        tokenizer: a `deepseek_model.tokenizer.Tokenizer` (tokenizers backend).

    Raises:
        ValueError: the vocabulary is not byte-level (a symbol outside the byte alphabet).
    """
    symbols = set(byte_symbols())
    tok = tokenizer._tok
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if token in specials:
            lengths[i] = len(token.encode("utf-8"))
            continue
        if any(ch not in symbols for ch in token):
            raise ValueError(f"{tokenizer.path}: token {token!r} is not byte-level; bits/byte needs a byte-level BPE")
        lengths[i] = len(token)
    return lengths


def windows(token_lists: Sequence[Sequence[int]], context: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of at most `context` tokens of each text.

    A final window shorter than 2 tokens predicts nothing and is dropped.

    Returns:
        1-D int64 tensors.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2, got {context!r}")
    out = []
    for ids in token_lists:
        t = torch.as_tensor(list(ids), dtype=torch.int64)
        out.extend(w for w in t.split(context) if len(w) >= 2)
    return out


def bits_per_byte(forward: Forward, wins: Sequence[torch.Tensor], byte_lengths: torch.Tensor,
                  batch: int = EVAL_BATCH, progress: Callable[[int], None] | None = None) -> BitsPerByte:
    """Held-out NLL and bytes of `wins` under `forward`.

    Args:
        forward: (B, T) ids → (B, T, V) logits (any float dtype; the NLL is taken in fp32).
        wins: windows from `windows()`; equal-length windows are batched together.
        byte_lengths: (V,) bytes per token id (`token_byte_lengths`).
        batch: windows per forward.
        progress: called with the number of windows done after each forward.

    Returns:
        The summed NLL, token and byte counts.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    nll, tokens, nbytes = 0.0, 0, 0
    by_len: dict[int, list[torch.Tensor]] = {}
    for w in wins:
        by_len.setdefault(len(w), []).append(w)
    with torch.no_grad():
        for group in by_len.values():
            for i in range(0, len(group), batch):
                ids = torch.stack(group[i:i + batch]).long()  # (B, T)
                logits = forward(ids).float()  # (B, T, V)
                targets = ids[:, 1:]  # (B, T-1)
                if int(targets.max()) >= byte_lengths.shape[0] or int(targets.min()) < 0:
                    raise ValueError(f"byte_lengths: covers token ids [0, {byte_lengths.shape[0]}), a window holds "
                                     f"{int(targets.max())}")
                nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       reduction="sum").item()
                tokens += targets.numel()
                nbytes += int(byte_lengths[targets].sum())
                if progress is not None:
                    progress(len(ids))
    if tokens == 0:
        raise ValueError("bits_per_byte: no predicted tokens (every window is shorter than 2 tokens)")
    return BitsPerByte(nll, tokens, nbytes)
