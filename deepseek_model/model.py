"""The whole network, top to bottom: Block, MTP, Transformer (and the per-layer latent Cache)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepseek_model import memory
from deepseek_model.attention import MLA, IndexKeyCache, LatentCache
from deepseek_model.config import ModelConfig
from deepseek_model.kernels import cpu_pack
from deepseek_model.layers import Linear, LinearSpec, ParallelEmbedding, ParallelHead, RMSNorm
from deepseek_model.moe import MLP, Gate, MoE, Routing
from deepseek_model.parallel import SINGLE_PROCESS, ParallelContext
from deepseek_model.rope import attention_factor, inv_frequencies, rotary_table


class Cache:
    """Latent caches of every decoder layer, plus one for the MTP block when the model has it.

    Args:
        num_layers: decoder layers.
        mtp: add a cache for the MTP block.
        fp8: store latents as float8 with a per-token scale (see LatentCache).
        index: give every layer an index-key cache (DeepSeek-V3.2); "fp8" holds the keys as e4m3
            with one scale per token, "float" exactly in the compute dtype, None: no indexer.
    """

    def __init__(self, num_layers: int, mtp: bool, fp8: bool = False, index: str | None = None,
                 shape: tuple | None = None):
        if index not in (None, "float", "fp8"):
            raise ValueError(f"index must be None, 'float' or 'fp8', got {index!r}")
        if not isinstance(fp8, bool):
            raise ValueError(f"fp8 must be True or False, got {fp8!r}")
        self.shape = shape  # what the model that made it caches (Transformer.cache_shape), checked on use

        def layer() -> LatentCache:
            return LatentCache(fp8, IndexKeyCache(index == "fp8") if index else None)

        self.layers = [layer() for _ in range(num_layers)]
        self.mtp = layer() if mtp else None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` in every layer (drop finished sequences)."""
        for c in self.layers + ([self.mtp] if self.mtp else []):
            c.select(rows)

    def nbytes(self) -> int:
        """Bytes held by all layer caches (the MTP cache included)."""
        return sum(c.nbytes() for c in self.layers) + (self.mtp.nbytes() if self.mtp else 0)


def check_max_seq_len(max_seq_len: int | None) -> None:
    """max_seq_len must be None (the config's max_position_embeddings) or a positive integer."""
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive integer or None, got {max_seq_len!r}")


def causal_mask(t: int, start_pos: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive mask (T, start_pos + T): query i (position start_pos + i) sees keys 0..start_pos + i."""
    if t == 1:
        return None
    return torch.full((t, start_pos + t), float("-inf"), dtype=dtype, device=device).triu_(start_pos + 1)


def row_mask(valid: torch.Tensor, t: int, start_pos: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, S) from per-row key validity (S = start_pos + T).

    Query slot q = start_pos + i of row b sees key slot s when s <= q and (valid[b, s] or s == q):
    invalid slots (left padding, rejected draft tokens) are hidden from every other query, and a
    query always sees itself so padded rows stay finite.
    """
    s = valid.shape[1]
    q_slot = torch.arange(start_pos, start_pos + t, device=valid.device).unsqueeze(-1)  # (T, 1)
    k_slot = torch.arange(s, device=valid.device)  # (S,)
    allowed = (k_slot <= q_slot) & (valid.unsqueeze(1) | (k_slot == q_slot))  # (B, T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, float("-inf"))
    return mask.unsqueeze(1)  # (B, 1, T, S)


def row_rotary(inv_freq: torch.Tensor, positions: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Per-row rotations (B, T, rope/2) complex64 for logical positions (B, T), as rotary_table."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.float()  # (B, T, rope/2)
    return torch.polar(torch.full_like(angles, magnitude), angles)


OUTPUTS = ("hidden_states", "router", "mtp_logits")  # what `Transformer.forward(..., outputs=...)` can return


@dataclass
class RouterOutput:
    """One MoE layer's routing decision for every token of a forward.

    Attributes:
        layer: the MoE module's name, e.g. `layers.3.ffn` (the MTP block: `mtp.block.ffn`).
        logits: (B, T, E) fp32 router logits (what transformers returns as `router_logits`).
        scores: (B, T, E) fp32 sigmoid (V3) or softmax (V2) scores, unbiased.
        indices: (B, T, K) chosen experts (selected with the correction bias, when the model has one).
        weights: (B, T, K) fp32 combine weights of those experts (normalised, routed_scaling_factor applied).
    """

    layer: str
    logits: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    @staticmethod
    def of(layer: str, r: Routing, bsz: int, t: int) -> RouterOutput:
        """Wrap a Routing of B·T flattened tokens."""
        return RouterOutput(layer, r.logits.view(bsz, t, -1), r.scores.view(bsz, t, -1),
                            r.indices.view(bsz, t, -1), r.weights.view(bsz, t, -1))  # (B, T, ·) each


@dataclass
class ModelOutput:
    """What `Transformer.forward(..., outputs=...)` returns (a field not asked for is None).

    Attributes:
        logits: (B, T, vocab) fp32.
        hidden_states: num_hidden_layers + 1 tensors (B, T, hidden): the embedding output, the
            output of each decoder layer but the last, and the last one after the final norm — the
            convention of transformers' `output_hidden_states`.
        router: one RouterOutput per MoE layer, in order (the MTP block's last, when mtp_logits
            were computed too).
        mtp_logits: (B, T-1, vocab) fp32, as `Transformer.mtp_logits`.
    """

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router: tuple[RouterOutput, ...] | None = None
    mtp_logits: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is dense or MoE."""

    def __init__(self, layer_idx: int, cfg: ModelConfig, spec: LinearSpec, ctx: ParallelContext, attn: str):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype, spec.device)
        self.attn = MLA(cfg, spec, ctx, attn)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype, spec.device)
        self.ffn = MoE(cfg, spec, ctx) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size,
                                                                               spec, ctx)

    def forward(self, x: torch.Tensor, start_pos: int, rotary: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCache | None, last_only: bool = False, router: list[Routing] | None = None) -> torch.Tensor:
        """(B, T, hidden) → (B, T, hidden); with last_only every token is cached but only the last
        one's output is computed: (B, 1, hidden). A MoE layer appends its routing to `router`."""
        h = self.attn(self.attn_norm(x), start_pos, rotary, mask, cache, last_only)  # (B, T or 1, hidden)
        x = (x[:, -1:] if last_only else x) + h
        ffn_in = self.ffn_norm(x)
        return x + (self.ffn(ffn_in, router) if isinstance(self.ffn, MoE) else self.ffn(ffn_in))


class MTP(nn.Module):
    """Multi-token prediction module (depth 1), stored as layer `num_hidden_layers`.

    Row i combines the main model's final (normed) hidden h_i with the embedding of token i+1 —
    embedding first: x = eh_proj([enorm(e_{i+1}) ; hnorm(h_i)]) — runs one decoder block, and
    predicts token i+2 with its own norm and head.
    """

    def __init__(self, cfg: ModelConfig, spec: LinearSpec, ctx: ParallelContext, attn: str):
        super().__init__()
        dtype, device = spec.dtype, spec.device
        self.embed = ParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, ctx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, spec, fp8=False)
        self.block = Block(cfg.mtp_layer_index, cfg, spec, ctx, attn)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.head = ParallelHead(cfg.hidden_size, cfg.vocab_size, dtype, device, ctx, spec.row_tile)

    def forward(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int, rotary: torch.Tensor,
                mask: torch.Tensor | None, cache: LatentCache | None, last_only: bool = False,
                router: list[Routing] | None = None) -> torch.Tensor:
        """Logits (B, T, V) fp32 for tokens two ahead ((B, 1, V) for the last row with last_only).

        Args:
            h: (B, T, hidden) main-model hidden states after the final norm, positions start_pos…
            next_ids: (B, T) the token following each of those positions.
            start_pos, rotary, mask, cache: as for Block.
            last_only: every row is cached, but attention output, FFN and head run for the last row
                only (a drafter needs no other): (B, 1, V).
            router: the block's routing is appended here when given (a MoE block).
        """
        x = torch.cat([self.enorm(self.embed(next_ids)), self.hnorm(h)], dim=-1)  # (B, T, 2·hidden)
        x = self.block(self.eh_proj(x), start_pos, rotary, mask, cache, last_only, router)  # (B, T or 1, hidden)
        return self.head(self.norm(x))


class Transformer(nn.Module):
    """DeepSeek-V2/V3/V3.2 causal LM: embedding, decoder blocks, final norm, head, optional MTP.

    Args:
        cfg: the checkpoint's config.
        spec: how linears store/run weights (dtype, device, fp8, backend).
        ctx: parallel context (single process by default).
        attn: "absorb" (latent-space attention, default) or "naive".
        mtp: build the MTP module when the config has one.
        max_seq_len: longest sequence accepted (default: config max_position_embeddings).
    """

    def __init__(self, cfg: ModelConfig, spec: LinearSpec | None = None, ctx: ParallelContext = SINGLE_PROCESS,
                 attn: str = "absorb", mtp: bool = True, max_seq_len: int | None = None):
        super().__init__()
        spec = spec or LinearSpec()
        self.cfg, self.spec, self.ctx = cfg, spec, ctx
        check_max_seq_len(max_seq_len)
        self.max_seq_len = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
        self.embed = ParallelEmbedding(cfg.vocab_size, cfg.hidden_size, spec.dtype, spec.device, ctx)
        self.layers = nn.ModuleList(Block(i, cfg, spec, ctx, attn) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype, spec.device)
        self.head = ParallelHead(cfg.hidden_size, cfg.vocab_size, spec.dtype, spec.device, ctx, spec.row_tile)
        self.mtp = MTP(cfg, spec, ctx, attn) if mtp and cfg.num_nextn_predict_layers else None
        self.register_buffer("inv_freq", inv_frequencies(cfg).to(spec.device), persistent=False)
        self.rope_magnitude = attention_factor(cfg)

    @property
    def has_mtp(self) -> bool:
        """Whether the MTP module is present."""
        return self.mtp is not None

    def pack_for_cpu(self) -> int:
        """Give every float32/bfloat16 projection on the CPU a oneDNN-blocked copy of its weight,
        which inference GEMMs then read (faster wherever the rows are few; see kernels.cpu_pack),
        every attention layer contiguous copies of kv_b's per-head up-projections for absorbed
        attention (MLA.pack), and every bfloat16 router a float32 copy of its weight (Gate.pack).

        The copies are snapshots: a weight changed or replaced afterwards is read directly again, and
        GEMMs that need a gradient never use them. fp8 weights, batch-invariant GEMMs and emulated-FP8
        training are left as they are. The memory is checked before any copy is made.

        Returns:
            Bytes allocated for the copies.

        Raises:
            RuntimeError: this torch build has no oneDNN.
            InsufficientMemory: the copies would not fit in the memory available.
        """
        if not cpu_pack.available():
            raise RuntimeError("pack_for_cpu: this torch build has no oneDNN (torch.backends.mkldnn)")
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        in_moe = {id(lin) for m in moes for ex in m.experts if ex is not None for lin in (ex.w1, ex.w2, ex.w3)}
        linears = [m for m in self.modules() if isinstance(m, (Linear, ParallelHead)) and id(m) not in in_moe]
        packers = moes + linears + [m for m in self.modules() if isinstance(m, MLA)]
        need = sum(p.pack_nbytes() for p in packers)
        memory.require(need, "packing the weights for CPU GEMMs (a second copy of every float projection)")
        return sum(p.pack() for p in packers)

    def _apply(self, fn, recurse: bool = True):
        """As nn.Module._apply (`.to`, `.bfloat16()`, ...), keeping the buffers that stay float32 in any
        compute dtype (the rotary frequencies, the routers' correction biases) at least that precise."""
        low = (torch.bfloat16, torch.float16)
        gates = [m for m in self.modules() if isinstance(m, Gate) and m.bias is not None]
        kept = (self.inv_freq, [g.bias for g in gates])  # the float32 originals: a round trip through bf16 would lose bits
        out = super()._apply(fn, recurse)
        if self.inv_freq.dtype in low:
            self.inv_freq = kept[0].to(device=self.inv_freq.device)
        for gate, bias in zip(gates, kept[1]):
            if gate.bias.dtype in low:
                gate.bias = bias.to(device=gate.bias.device)
        return out

    def new_cache(self, fp8: bool = False, index_fp8: bool | None = None) -> Cache:
        """An empty latent cache; it grows as tokens are written.

        Args:
            fp8: float8 latents with a per-token scale.
            index_fp8: (DeepSeek-V3.2) float8 index keys with a per-token scale, as DeepSeek's
                inference kernels keep them; default: as `fp8`. False keeps them exact.
        """
        if index_fp8 is not None and not isinstance(index_fp8, bool):
            raise ValueError(f"index_fp8 must be True, False or None, got {index_fp8!r}")
        index = None
        if self.cfg.has_indexer:
            index = "fp8" if (fp8 if index_fp8 is None else index_fp8) else "float"
        return Cache(len(self.layers), self.has_mtp, fp8, index, self.cache_shape())

    def cache_shape(self) -> tuple:
        """What this model's caches hold: (layers, MTP cache, latent width, rope width, index-key width)."""
        cfg = self.cfg
        return (len(self.layers), self.has_mtp, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                cfg.index_head_dim if cfg.has_indexer else None)

    def _check_cache(self, cache: Cache | None) -> None:
        if cache is None:
            return
        if not isinstance(cache, Cache):
            raise ValueError(f"cache must be a Cache from model.new_cache(), got {type(cache).__name__}")
        if cache.shape != self.cache_shape():
            raise ValueError(f"cache: made for a model that caches {cache.shape} (layers, MTP, latent, rope, index "
                             f"keys), this one caches {self.cache_shape()}: make caches with this model's new_cache()")

    def _check_input(self, input_ids: torch.Tensor, start_pos: int) -> None:
        if isinstance(start_pos, bool) or not isinstance(start_pos, int):
            raise ValueError(f"start_pos must be an integer, got {start_pos!r}")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a (batch, seq) integer tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if not input_ids.numel():
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): at least one row of at least "
                             "one token is needed")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size:
            raise ValueError(f"input_ids contain a token id outside [0, vocab_size={self.cfg.vocab_size})")
        end = start_pos + input_ids.shape[1]
        if start_pos < 0 or end > self.max_seq_len:
            raise ValueError(f"positions [{start_pos}, {end}) exceed max_seq_len {self.max_seq_len}")

    def _rotary_and_mask(self, t: int, start_pos: int, positions: torch.Tensor | None = None,
                         valid: torch.Tensor | None = None, bsz: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        if positions is None and self.spec.batch_invariant:  # each position's cos/sin computed alone
            rotary = torch.cat([rotary_table(self.inv_freq, start_pos + i, 1, self.rope_magnitude)
                                for i in range(t)]) if t else rotary_table(self.inv_freq, start_pos, 0)  # (T, rope/2)
        elif positions is None:
            rotary = rotary_table(self.inv_freq, start_pos, t, self.rope_magnitude)  # (T, rope/2)
        else:
            if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"positions must be an integer tensor of shape {(bsz, t)}, got "
                                 f"{getattr(positions, 'dtype', type(positions).__name__)}")
            if tuple(positions.shape) != (bsz, t):
                raise ValueError(f"positions must have shape {(bsz, t)}, got {tuple(positions.shape)}")
            if self.spec.batch_invariant:  # each position alone, as rotary_table computes it
                rotary = torch.stack([torch.cat([rotary_table(self.inv_freq, int(p), 1, self.rope_magnitude)
                                                 for p in row]) for row in positions.tolist()])  # (B, T, rope/2)
            else:
                rotary = row_rotary(self.inv_freq, positions.to(self.inv_freq.device), self.rope_magnitude)  # (B, T, rope/2)
        if valid is None:
            return rotary, causal_mask(t, start_pos, self.spec.dtype, self.inv_freq.device)
        if not isinstance(valid, torch.Tensor) or tuple(valid.shape) != (bsz, start_pos + t) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape {(bsz, start_pos + t)}, got "
                             f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
        return rotary, row_mask(valid.to(self.inv_freq.device), t, start_pos, self.spec.dtype)

    def hidden(self, input_ids: torch.Tensor, start_pos: int = 0, cache: Cache | None = None, *,
               positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states after the last norm: (B, T, hidden).

        Args:
            input_ids: (B, T) token ids, written at cache slots [start_pos, start_pos + T).
            start_pos: first cache slot.
            cache: the latent cache (None: plain causal prefill from slot 0).
            positions: optional (B, T) RoPE positions per row (default start_pos + arange(T));
                rows whose slots are offset by left padding or rejected drafts pass their own.
            valid: optional (B, start_pos + T) bool: which key slots may be attended (default all).
        """
        return self._trunk(input_ids, start_pos, cache, positions, valid, None, None)

    def _trunk(self, input_ids: torch.Tensor, start_pos: int, cache: Cache | None, positions: torch.Tensor | None,
               valid: torch.Tensor | None, states: list[torch.Tensor] | None,
               router: list[RouterOutput] | None) -> torch.Tensor:
        """The decoder stack: (B, T) ids → (B, T, hidden) after the final norm; per-layer hidden states
        and routings are appended to `states` / `router` when given."""
        self._check_input(input_ids, start_pos)
        self._check_cache(cache)
        bsz, t = input_ids.shape
        rotary, mask = self._rotary_and_mask(t, start_pos, positions, valid, bsz)
        x = self.embed(input_ids)  # (B, T, hidden)
        for i, layer in enumerate(self.layers):
            if states is not None:
                states.append(x)
            routed: list[Routing] | None = [] if router is not None else None
            x = layer(x, start_pos, rotary, mask, cache.layers[i] if cache is not None else None, router=routed)
            if routed:
                router.append(RouterOutput.of(f"layers.{i}.ffn", routed[0], bsz, t))
        x = self.norm(x)
        if states is not None:
            states.append(x)  # the last layer's output is reported after the final norm
        return x

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: Cache | None = None, *,
                positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                outputs: tuple[str, ...] | set[str] | frozenset[str] = ()) -> torch.Tensor | ModelOutput:
        """Logits (B, T, vocab) in fp32 — or, when `outputs` names anything, a ModelOutput.

        Without a cache this is a full causal prefill (start_pos must be 0); with a cache, tokens
        are written at positions [start_pos, start_pos + T) and attend to everything before.
        `positions` / `valid` as for `hidden` (per-row positions and key validity).

        Args:
            outputs: any of "hidden_states" (per-layer hidden states), "router" (per MoE layer:
                logits, scores, chosen experts and their weights) and "mtp_logits" (the MTP
                module's predictions over the same tokens; full prefill only). Everything is
                returned, nothing is kept on the modules.
        """
        if not outputs:
            return self.head(self.hidden(input_ids, start_pos, cache, positions=positions, valid=valid))
        if isinstance(outputs, str):
            raise ValueError(f"outputs must be a set of names, e.g. {{{outputs!r}}}, got the string {outputs!r}")
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"outputs: unknown {sorted(unknown)} (choose from {list(OUTPUTS)})")
        states = [] if "hidden_states" in outputs else None
        router = [] if "router" in outputs else None
        h = self._trunk(input_ids, start_pos, cache, positions, valid, states, router)  # (B, T, hidden)
        out = ModelOutput(self.head(h), tuple(states) if states is not None else None)
        if "mtp_logits" in outputs:
            if cache is not None or start_pos or positions is not None or valid is not None:
                raise ValueError("outputs: mtp_logits needs a plain full prefill (no cache, positions or valid)")
            out.mtp_logits = self._mtp_prefill(h, input_ids, router)
        out.router = tuple(router) if router is not None else None
        return out

    def _mtp_prefill(self, h: torch.Tensor, input_ids: torch.Tensor,
                     router: list[RouterOutput] | None) -> torch.Tensor:
        """MTP logits (B, T-1, V) over a prefilled sequence from its final hidden states (B, T, hidden)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP module (checkpoint without it, or loaded with mtp=False)")
        bsz, t = input_ids.shape[0], input_ids.shape[1] - 1
        if t == 0:  # one token: nothing to predict two ahead of
            if router is not None and isinstance(self.mtp.block.ffn, MoE):  # an empty routing record, as for T > 1
                e, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
                router.append(RouterOutput("mtp.block.ffn", *(h.new_zeros(bsz, 0, n, dtype=torch.float32) for n in (e, e)),
                                           input_ids.new_zeros(bsz, 0, k), h.new_zeros(bsz, 0, k, dtype=torch.float32)))
            return h.new_zeros(bsz, 0, self.cfg.vocab_size, dtype=torch.float32)  # (B, 0, V)
        rotary, mask = self._rotary_and_mask(t, 0)
        routed: list[Routing] | None = [] if router is not None else None
        logits = self.mtp(h[:, :-1], input_ids[:, 1:], 0, rotary, mask, None, router=routed)  # (B, T-1, V)
        if routed:
            router.append(RouterOutput.of("mtp.block.ffn", routed[0], bsz, t))
        return logits

    def mtp_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """MTP predictions (B, T-1, vocab) fp32: row i uses h_i and token i+1 and predicts token i+2."""
        if self.mtp is None:
            raise ValueError("this model has no MTP module (checkpoint without it, or loaded with mtp=False)")
        return self._mtp_prefill(self.hidden(input_ids), input_ids, None)

    def mtp_step(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int, cache: Cache, *,
                 positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 last_only: bool = False) -> torch.Tensor:
        """MTP logits for positions [start_pos, start_pos + T) using the MTP block's cache.

        Args:
            h: (B, T, hidden) main hidden states (after norm) at those positions.
            next_ids: (B, T) the tokens that follow them.
            start_pos: position of h[:, 0].
            cache: the model cache (its `mtp` layer is used).
            positions, valid: per-row positions and key validity, as for `hidden`.
            last_only: logits (B, 1, V) of the last position only (every position is still cached).
        """
        if self.mtp is None:
            raise ValueError("this model has no MTP module")
        self._check_cache(cache)
        if cache is None or cache.mtp is None:
            raise ValueError("cache: mtp_step needs a cache with an MTP layer (this model's new_cache())")
        if h.dim() != 3 or h.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"h must be (batch, seq, hidden_size={self.cfg.hidden_size}), got shape {tuple(h.shape)}")
        if tuple(next_ids.shape) != tuple(h.shape[:2]):
            raise ValueError(f"next_ids must be (batch, seq) = {tuple(h.shape[:2])} like h, got {tuple(next_ids.shape)}")
        self._check_input(next_ids, start_pos)
        rotary, mask = self._rotary_and_mask(h.shape[1], start_pos, positions, valid, h.shape[0])
        return self.mtp(h, next_ids, start_pos, rotary, mask, cache.mtp, last_only)
