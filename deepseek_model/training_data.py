"""Training corpora for the small training loop: a synthetic Markov corpus and byte-level text.

Both yield packed batches: `Batch.ids` (B, T) token ids and `Batch.doc_ids` (B, T) document
numbers, so losses can ignore targets that cross a document boundary.

The synthetic corpus has learnable structure and a skewed token distribution: token frequencies
follow a Zipf law (a few tokens dominate, as in natural text), and each token is followed by one of
a few fixed successors with fixed probabilities (a sparse bigram chain), so a model can learn the
next token (and, less sharply, the one after it). The skew makes a randomly initialised router
imbalanced, which is what the bias update has to correct.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ZIPF_EXPONENT = 1.1  # unigram skew of the synthetic corpus
SUCCESSOR_PROBS = (0.6, 0.25, 0.1, 0.05)  # the bigram chain: each token's successors, most likely first
NOISE = 0.1  # probability of a token drawn from the unigram law instead of the chain
MEAN_DOC_LEN = 48  # mean document length of packed synthetic sequences
BYTE_VOCAB = 256


@dataclass
class Batch:
    """A packed batch.

    Attributes:
        ids: (B, T) int64 token ids.
        doc_ids: (B, T) int64 document number of each token (non-decreasing along T).
    """

    ids: torch.Tensor
    doc_ids: torch.Tensor


def _doc_ids(batch: int, seq_len: int, mean_len: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) document numbers: a new document starts at each position with probability 1/mean_len."""
    starts = torch.rand(batch, seq_len, generator=gen) < 1.0 / mean_len  # (B, T)
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)  # (B, T)


class SyntheticCorpus:
    """Zipf-skewed sparse bigram chain over `vocab_size` tokens (token 0 is BOS).

    Args:
        vocab_size: number of token ids (>= 8).
        seed: seed of the chain itself (successors and unigram ranks); sampling has its own generator.
    """

    def __init__(self, vocab_size: int, seed: int = 0):
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
        self.vocab_size = vocab_size
        gen = torch.Generator().manual_seed(seed)
        ranks = torch.arange(1, vocab_size, dtype=torch.float64)
        unigram = ranks.pow(-ZIPF_EXPONENT)
        unigram = unigram / unigram.sum()  # (V-1,) over tokens 1..V-1, in rank order
        perm = torch.randperm(vocab_size - 1, generator=gen) + 1  # rank r → token id perm[r]
        self.unigram = torch.zeros(vocab_size, dtype=torch.float64)
        self.unigram[perm] = unigram  # (V,), BOS never drawn
        k = len(SUCCESSOR_PROBS)
        self.successors = torch.multinomial(self.unigram.expand(vocab_size, -1), k, replacement=False,
                                            generator=gen)  # (V, k): successors favour frequent tokens
        self.succ_probs = torch.tensor(SUCCESSOR_PROBS, dtype=torch.float64)

    def sample(self, batch: int, seq_len: int, gen: torch.Generator) -> Batch:
        """Draw a packed batch (documents start with BOS = 0).

        Args:
            batch: B.
            seq_len: T.
            gen: CPU generator (the stream of batches is a function of its seed).
        """
        doc = _doc_ids(batch, seq_len, MEAN_DOC_LEN, gen)  # (B, T)
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]  # (B, T) True at each document's first token
        choice = torch.multinomial(self.succ_probs, batch * seq_len, replacement=True,
                                   generator=gen).view(batch, seq_len)  # (B, T) successor slot
        noise = torch.multinomial(self.unigram, batch * seq_len, replacement=True,
                                  generator=gen).view(batch, seq_len)  # (B, T) unigram draws
        use_noise = torch.rand(batch, seq_len, generator=gen) < NOISE  # (B, T)
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        for t in range(1, seq_len):
            nxt = self.successors[ids[:, t - 1], choice[:, t]]  # (B,)
            nxt = torch.where(use_noise[:, t] | (ids[:, t - 1] == 0), noise[:, t], nxt)  # a document opens at random
            ids[:, t] = torch.where(starts[:, t], 0, nxt)
        return Batch(ids, doc)


class ByteCorpus:
    """Byte-level tokens of a text file; batches are random windows (one document each).

    Args:
        path: the file.
        vocab_size: model vocabulary (must be >= 256).
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        if vocab_size < BYTE_VOCAB:
            raise ValueError(f"vocab_size must be >= {BYTE_VOCAB} for byte-level text, got {vocab_size}")
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 2:
            raise ValueError(f"{os.fspath(path)}: text file has fewer than 2 bytes")
        self.vocab_size = vocab_size
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # (bytes,)

    def sample(self, batch: int, seq_len: int, gen: torch.Generator) -> Batch:
        """Random windows of `seq_len` bytes (shorter files are tiled)."""
        data = self.data
        if len(data) < seq_len + 1:
            data = data.repeat(-(-(seq_len + 1) // len(data)))
        starts = torch.randint(0, len(data) - seq_len + 1, (batch,), generator=gen)  # (B,)
        ids = data[starts.unsqueeze(1) + torch.arange(seq_len)]  # (B, T)
        return Batch(ids, torch.zeros_like(ids))
