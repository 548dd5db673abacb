"""Deterministic tiny checkpoints in the exact published HF on-disk layout.

`make_tiny_checkpoint` writes config.json (real field names), `model.safetensors.index.json`, several
shards named like the real repository (`model-00001-of-000004.safetensors`), FP8 weights with
block scales exactly where the published checkpoint has them (some scales in another shard
than their weight), a ragged kv_a projection (kv_lora_rank + rope rows), an MTP layer at index num_hidden_layers, and finite
router biases of both signs. Tests and the demo use it; nothing is downloaded.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
from typing import Any, Iterator

import torch

from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model import memory
from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.writer import DEFAULT_SHARDS, write_checkpoint
from deepseek_model.kernels import ops
from deepseek_model.tokenizer import (ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, byte_symbols,
                                      write_tokenizer_config)

TINY_TOKENIZER_VOCAB = 512  # the tiny tokenizer never exceeds this, even for larger-vocab configs
INDEXER_PREFIX = "self_attn.indexer."  # the DeepSeek-V3.2 indexer's tensor families (see checkpoint/schema.py)
ROUTER_BIAS_RANGE = 0.25  # biases drawn from U(-r, r): both signs, large enough to change routing
# The tiny tokenizer: DeepSeek's special tokens at the config's bos (0) / eos (1) ids, then the 256
# byte-level symbols, then BPE merges learned from TOKENIZER_CORPUS up to the vocabulary size.
TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world! Hello there, how are you today? "
    "DeepSeek-V3 is a mixture-of-experts language model with multi-head latent attention. "
    "The model predicts the next token, and the multi-token prediction module predicts the one after it. "
    "Once upon a time there was a little model that wanted to generate text on a small computer. "
    "What is the capital of France? The capital of France is Paris. One, two, three, four, five. "
    "def main():\n    return 0\n\nprint('hello, world')\n 0 1 2 3 4 5 6 7 8 9 10 100 2024"
)
_PRETOKEN_RE = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block, then restore the thread count (on a busy 2-core
    machine a thread pool mostly waits for its threads; tests build and run tiny models this way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _config_dict(config: str | dict | ModelConfig, fp8: bool, mtp: bool) -> dict[str, Any]:
    if isinstance(config, ModelConfig):
        d = config.to_dict()
    elif isinstance(config, dict):
        d = dict(config)
    else:
        d = builtin_config_dict(config)
    if fp8:
        d.setdefault("quantization_config", {"activation_scheme": "dynamic", "fmt": "e4m3",
                                             "quant_method": "fp8", "weight_block_size": [128, 128]})
    else:
        d.pop("quantization_config", None)
    if not mtp:
        d["num_nextn_predict_layers"] = 0
    d["torch_dtype"] = "bfloat16"
    return d


def _init_tensor(fam: schema.TensorFamily, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A deterministic fp32 value for one HF tensor, scaled so logits come out O(1)."""
    if fam.keep_fp32 and len(shape) == 1:  # the router's correction bias
        return (torch.rand(shape, generator=gen) * 2 - 1) * ROUTER_BIAS_RANGE
    if fam.hf.endswith(".bias"):  # a LayerNorm's bias (the V3.2 indexer's k_norm): small, both signs
        return 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # norm weights: near one, varied
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if fam.internal == "embed.weight":
        return torch.randn(shape, generator=gen)
    fan_in = shape[1]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def make_tiny_tensors(cfg: ModelConfig, fp8: bool = False, seed: int = 0,
                      mtp: bool = True) -> dict[str, torch.Tensor]:
    """The full HF state dict of a random model: bf16 (router bias fp32), or FP8 where published.

    The MTP copies of embed_tokens / shared_head.head equal the main embedding / lm_head byte for
    byte, as in the released checkpoint.
    """
    gen = torch.Generator().manual_seed(seed)
    block = cfg.quantization.block_size[0] if cfg.quantization else ops.reference.BLOCK
    scale_fmt = cfg.quantization.scale_fmt if cfg.quantization else None
    tensors: dict[str, torch.Tensor] = {}
    mtp_prefix = f"model.layers.{cfg.mtp_layer_index}."
    for name, shape, fam in schema.hf_weights(cfg, mtp=mtp):
        if name == mtp_prefix + "embed_tokens.weight":
            tensors[name] = tensors["model.embed_tokens.weight"].clone()
            continue
        if name == mtp_prefix + "shared_head.head.weight":
            tensors[name] = tensors["lm_head.weight"].clone()
            continue
        value = _init_tensor(fam, shape, gen)
        if fam.keep_fp32:
            tensors[name] = value.float()
        elif fp8 and fam.fp8:
            q, s = ops.weight_quant(value, block, scale_fmt)
            tensors[name] = q
            tensors[schema.scale_name(name)] = s
        else:
            tensors[name] = value.to(torch.bfloat16)
    return tensors


def _learn_merges(corpus: str, num_merges: int, symbols: list[str]) -> list[tuple[str, str]]:
    """Plain BPE on the byte-level corpus: repeatedly merge the most frequent adjacent pair
    (ties: the lexicographically smallest pair), deterministic."""
    words = collections.Counter(tuple(symbols[b] for b in w.encode("utf-8")) for w in _PRETOKEN_RE.findall(corpus))
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: collections.Counter = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def write_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512, bos_id: int = 0, eos_id: int = 1,
                         model_max_length: int = 1024) -> None:
    """Write a tiny byte-level BPE tokenizer.json and a tokenizer_config.json with a DeepSeek-style
    chat template (no downloads; deterministic bytes).

    Args:
        out_dir: checkpoint directory.
        vocab_size: total vocabulary (special tokens + 256 byte symbols + merges), at most the model's.
        bos_id: id of <｜begin▁of▁sentence｜> (must be 0 or 1, as DeepSeek configs use).
        eos_id: id of <｜end▁of▁sentence｜>.
        model_max_length: recorded in tokenizer_config.json.
    """
    if {bos_id, eos_id} != {0, 1}:
        raise ValueError(f"bos_id/eos_id must be 0 and 1 in some order, got {bos_id}/{eos_id}")
    specials = [BOS_TOKEN, EOS_TOKEN] if bos_id == 0 else [EOS_TOKEN, BOS_TOKEN]
    specials += [USER_TOKEN, ASSISTANT_TOKEN]
    symbols = byte_symbols()
    base = len(specials) + len(symbols)
    if vocab_size < base:
        raise ValueError(f"vocab_size must be >= {base} for a byte-level tokenizer, got {vocab_size}")
    merges = _learn_merges(TOKENIZER_CORPUS, vocab_size - base, symbols)
    vocab = {t: i for i, t in enumerate(specials + symbols + [a + b for a, b in merges])}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(specials)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [bos_id], "tokens": [BOS_TOKEN]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, indent=2, ensure_ascii=False)
    write_tokenizer_config(out_dir, model_max_length)


def check_build_memory(config: str | dict | ModelConfig, fp8: bool, mtp: bool, where: str) -> None:
    """Refuse (InsufficientMemory, one line) a `make_tiny_checkpoint` that would not fit in memory:
    every tensor is held until written, and a shard is serialized once more."""
    cfg = ModelConfig.from_dict(_config_dict(config, fp8, mtp), source="config")
    memory.require(2 * memory.model_bytes(cfg, 2, fp8=fp8, mtp=mtp), f"building the checkpoint in {where}")


def make_tiny_checkpoint(out_dir: str | os.PathLike, config: str | dict | ModelConfig = "tiny",
                         fp8: bool = False, seed: int = 0, mtp: bool = True,
                         num_shards: int = DEFAULT_SHARDS) -> str:
    """Build a deterministic random checkpoint in the published HF layout.

    Args:
        out_dir: directory to write.
        config: a built-in config name ("tiny", "tiny-v2", "small", ...), an HF config dict or a
            ModelConfig.
        fp8: store the published FP8 tensor set as float8_e4m3fn + block scale.
        seed: RNG seed; the same arguments give byte-identical files.
        mtp: include the MTP layer (when the config has num_nextn_predict_layers).
        num_shards: number of shard files.

    Returns:
        The checkpoint directory.
    """
    d = _config_dict(config, fp8, mtp)
    cfg = ModelConfig.from_dict(d, source="config")
    check_build_memory(config, fp8, mtp, os.fspath(out_dir))
    tensors = make_tiny_tensors(cfg, fp8=fp8, seed=seed, mtp=mtp)
    path = write_checkpoint(out_dir, tensors, d, num_shards=num_shards)
    if cfg.bos_token_id in (0, 1) and cfg.eos_token_id in (0, 1) and cfg.bos_token_id != cfg.eos_token_id:
        write_tiny_tokenizer(path, min(cfg.vocab_size, TINY_TOKENIZER_VOCAB), cfg.bos_token_id, cfg.eos_token_id,
                             cfg.max_position_embeddings)
    return path


def write_dense_twin(src: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """The weights of DeepSeek-V3.2 checkpoint `src` as a DeepSeek-V3 checkpoint in `out_dir`: the
    indexer tensors dropped, the config without its index fields, model_type deepseek_v3 and the
    routing spelled out (V3.2 configs may leave it implicit). Returns out_dir."""
    from deepseek_model.checkpoint.reader import CheckpointReader  # noqa: PLC0415

    reader = CheckpointReader(src)
    cfg = ModelConfig.from_dict(reader.config(), source=str(src))
    d = {k: v for k, v in reader.config().items() if not k.startswith("index_") and k != "layer_types"}
    d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], scoring_func=cfg.scoring_func,
             topk_method=cfg.topk_method, norm_topk_prob=cfg.norm_topk_prob)
    def indexer(name: str) -> bool:
        found = schema.match(name, cfg.num_hidden_layers)
        return found is not None and found.family.hf.startswith(INDEXER_PREFIX)

    return write_checkpoint(out_dir, {n: reader.get(n) for n in reader.names() if not indexer(n)}, d)
