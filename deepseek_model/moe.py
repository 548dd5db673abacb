"""DeepSeekMoE: the Gate (router), SwiGLU experts, and the MoE layer with shared experts.

Routing follows the config: V3 sigmoid scores with the fp32 correction bias used for selection
only ("noaux_tc", top-2 group sums), or V2 softmax scores ("group_limited_greedy" with group max,
or plain "greedy"). Masked groups are set to -inf, never 0: biased scores can be negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_model.config import ModelConfig
from deepseek_model.kernels import cpu_pack, ops
from deepseek_model.kernels.cpu_pack import PackedWeight, Snapshot
from deepseek_model.layers import ColumnParallelLinear, Linear, LinearSpec, RowParallelLinear
from deepseek_model.parallel import SINGLE_PROCESS, ParallelContext

NORM_EPS = 1e-20  # added to the sum of the top-k weights before renormalising
GROUP_TOP = 2  # noaux_tc scores a group by the sum of its best two experts
FEW_PAIRS = 16  # (token, expert) choices up to which inference takes the few-token path (decoding)


def _topk_stable(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of the last dim; ties go to the lower index."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


@dataclass(frozen=True)
class FloatWeight:
    """A float32 copy of a lower-precision weight (Gate.pack) and the state of the weight it was made from."""

    weight: torch.Tensor
    origin: Snapshot

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of a packed model is unpacked (as kernels.cpu_pack.PackedWeight is)."""
        return None


@dataclass(frozen=True)
class ExpertStack:
    """The local experts' weights stacked into a few tensors that the experts' parameters then
    view (no weight is held twice; in-place updates of either reach both), with where each
    expert's parameters lay when stacked. A parameter replaced, reassigned (`.data =`, a dtype or
    device conversion, `load_state_dict(assign=True)`) or deep-copied since then no longer lies
    there: the stack no longer holds it and is rebuilt from the parameters.

    Attributes:
        tensors: the stacked tensors, e.g. (w13 (E_local, 2I, H), w2 (E_local, H, I)).
        pointers: per local expert, the data pointers of its parameters (in `MoE._expert_params` order).
    """

    tensors: tuple[torch.Tensor, ...]
    pointers: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: tuple[torch.Tensor, ...], params: list[tuple[torch.Tensor, ...]]) -> ExpertStack:
        """Record `tensors` and where each expert's parameters (viewing them) lie now."""
        return cls(tensors, tuple(tuple(p.data_ptr() for p in ps) for ps in params))

    def holds(self, i: int, params: tuple[torch.Tensor, ...]) -> bool:
        """Whether local expert i's parameters are still the views this stack made."""
        return tuple(p.data_ptr() for p in params) == self.pointers[i]

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy's parameters are fresh tensors that view nothing: the copy stacks its own."""
        return None


def _expert_params(ex: Expert, fp8: bool) -> tuple[torch.Tensor, ...]:
    """An expert's stacked parameters: (w1, w3, w2) weights, then their scales for fp8 weights."""
    weights = (ex.w1.weight, ex.w3.weight, ex.w2.weight)
    return weights + (ex.w1.scale, ex.w3.scale, ex.w2.scale) if fp8 else weights


@dataclass
class Routing:
    """One router decision for N tokens.

    Attributes:
        weights: (N, K) combine weights (after normalisation and routed_scaling_factor), fp32.
        indices: (N, K) expert ids.
        scores: (N, E) fp32 scores (sigmoid or softmax), unbiased; kept for balance losses.
        logits: (N, E) fp32 router logits before scoring.
    """

    weights: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor


class Gate(nn.Module):
    """The router: fp32 logits, per-config scoring, group-limited top-k.

    Args:
        cfg: model config (scoring_func, topk_method, n_group, topk_group, num_experts_per_tok,
            norm_topk_prob, routed_scaling_factor).
        dtype: storage dtype of the router weight.
        device: where parameters live.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, row_tile: int | None = None):
        super().__init__()
        self.row_tile = row_tile  # batch-invariant mode: the logits GEMM on fixed row tiles
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.v2_weights = cfg.raw.get("model_type") == "deepseek_v2"  # V2 scales only weights it does not normalise
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype, device=device))
        if cfg.topk_method == "noaux_tc":
            # The correction bias steers selection only and never receives gradients.
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32, device=device))
        else:
            self.bias = None
        self.float_weight: FloatWeight | None = None  # made by pack()

    def pack(self) -> int:
        """A float32 copy of a lower-precision router weight, which the fp32 logits GEMM then reads
        instead of converting the weight on every call (0.15 ms a layer per bfloat16 decode step on
        the bench's small config). Returns the bytes allocated."""
        n = self.pack_nbytes()
        if n:
            self.float_weight = FloatWeight(self.weight.detach().float(), Snapshot.of((self.weight,)))
        return n

    def pack_nbytes(self) -> int:
        """Bytes pack() allocates (0 for a float32 weight, which the GEMM reads as it is)."""
        w = self.weight
        return 0 if w.dtype == torch.float32 or self.row_tile or not cpu_pack.packable(w) else w.numel() * 4

    def _weight32(self) -> torch.Tensor:
        """The router weight in float32: pack()'s copy while it still holds the weight and no
        gradient is wanted, else converted now."""
        copy = self.float_weight
        if copy is not None and copy.origin.usable():
            return copy.weight
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> Routing:
        """Route tokens x (N, hidden)."""
        logits = ops.linear(x.float(), self._weight32(), row_tile=self.row_tile)  # (N, E) fp32
        score = torch.sigmoid if self.scoring_func == "sigmoid" else (lambda t: t.softmax(dim=-1))
        scores = ops.rowwise(score, logits, self.row_tile is not None)  # (N, E)
        choice = scores if self.bias is None else scores + self.bias  # (N, E), selection only
        if self.method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(GROUP_TOP, dim=-1).values.sum(dim=-1)  # (N, G)
            else:
                group_scores = grouped.amax(dim=-1)  # (N, G)
            keep = _topk_stable(group_scores, self.topk_group)  # (N, topk_group)
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # True = drop
            choice = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(1)  # (N, E)
        indices = _topk_stable(choice, self.topk)  # (N, K)
        weights = scores.gather(1, indices)  # unbiased scores of the chosen experts
        if self.v2_weights:  # DeepSeek-V2's rule: renormalise (top-k > 1 only) or scale, never both
            if self.norm_topk_prob and self.topk > 1:
                return Routing(weights / (weights.sum(dim=-1, keepdim=True) + NORM_EPS), indices, scores, logits)
            return Routing(weights * self.route_scale, indices, scores, logits)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + NORM_EPS)
        return Routing(weights * self.route_scale, indices, scores, logits)


class Expert(nn.Module):
    """One routed expert, held whole by one rank: down(silu(gate(x)) · up(x))."""

    def __init__(self, dim: int, inter_dim: int, spec: LinearSpec):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, spec)
        self.w2 = Linear(inter_dim, dim, spec)
        self.w3 = Linear(dim, inter_dim, spec)
        self.invariant = spec.batch_invariant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.rowwise(F.silu, self.w1(x), self.invariant) * self.w3(x))


class MLP(nn.Module):
    """Tensor-parallel SwiGLU MLP (dense layers and the shared experts)."""

    def __init__(self, dim: int, inter_dim: int, spec: LinearSpec, ctx: ParallelContext = SINGLE_PROCESS):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, inter_dim, spec, ctx)
        self.w2 = RowParallelLinear(inter_dim, dim, spec, ctx)
        self.w3 = ColumnParallelLinear(dim, inter_dim, spec, ctx)
        self.invariant = spec.batch_invariant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.rowwise(F.silu, self.w1(x), self.invariant) * self.w3(x))


class MoE(nn.Module):
    """Routed experts (expert-parallel: this rank holds experts [lo, hi)) plus shared experts.

    Args:
        cfg: model config.
        spec: linear storage/compute.
        ctx: parallel context.
    """

    def __init__(self, cfg: ModelConfig, spec: LinearSpec, ctx: ParallelContext = SINGLE_PROCESS):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        local = ctx.split(cfg.n_routed_experts, "n_routed_experts")
        self.lo, self.hi = ctx.rank * local, (ctx.rank + 1) * local
        self.ctx = ctx
        self.gate = Gate(cfg, spec.dtype, spec.device, spec.row_tile)
        self.row_tile = spec.row_tile
        self.experts = nn.ModuleList(
            [Expert(cfg.hidden_size, cfg.moe_intermediate_size, spec) if self.lo <= e < self.hi else None
             for e in range(cfg.n_routed_experts)])
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, spec, ctx)
                               if cfg.n_shared_experts else None)
        self.packed_experts: list[tuple[PackedWeight, PackedWeight]] | None = None  # made by pack()
        self.dense_stack: ExpertStack | None = None  # made on first dense inference use (_dense_stack)
        self.fp8_stack: ExpertStack | None = None  # made on first fused W8A8 use (_fused_experts)

    def pack(self) -> int:
        """oneDNN-blocked copies of the local routed experts' stacked weights (gate‖up and down,
        per expert), read by CPU inference GEMMs (see kernels.cpu_pack), and the router's float32
        copy (Gate.pack); the shared experts are packed as Linears. Returns the bytes allocated (no
        expert copies for fp8, emulated-FP8 or batch-invariant experts, which keep their own paths)."""
        gate = self.gate.pack()
        if not self._experts_packable():
            return gate
        self.packed_experts = None  # an earlier packing is freed first
        w13, w2 = self._dense_stack().tensors  # (E_local, 2I, H), (E_local, H, I); the parameters view them
        local = [self.experts[e] for e in range(self.lo, self.hi)]
        self.packed_experts = [(PackedWeight.of(w13[i], sources=(ex.w1.weight, ex.w3.weight)),
                                PackedWeight.of(w2[i], sources=(ex.w2.weight,))) for i, ex in enumerate(local)]
        return gate + sum(a.nbytes + b.nbytes for a, b in self.packed_experts)

    def pack_nbytes(self) -> int:
        """Bytes pack() allocates: the router's copy, plus the local experts' weights once where they are packed."""
        local = [self.experts[e] for e in range(self.lo, self.hi)] if self._experts_packable() else []
        experts = sum(lin.weight.numel() * lin.weight.element_size() for ex in local for lin in (ex.w1, ex.w2, ex.w3))
        return self.gate.pack_nbytes() + experts

    def _experts_packable(self) -> bool:
        """Whether the local experts get packed copies (dense float CPU weights on the stacked inference path)."""
        first = self.experts[self.lo]
        return not (first.w1.is_fp8 or first.w1.fake_fp8 or self.row_tile or not cpu_pack.packable(first.w1.weight))

    def forward(self, x: torch.Tensor, router: list[Routing] | None = None) -> torch.Tensor:
        """(..., hidden) → (..., hidden); the routing decision is appended to `router` when given."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, hidden)
        routing = self.gate(flat)
        if router is not None:
            router.append(routing)
        fused = None if self.row_tile else self._fused_experts()  # grouped ops are not batch-invariant
        if fused is not None:  # fp8 experts: one grouped W8A8 op (Triton kernel or its torch twin)
            spec = self.experts[self.lo].w1.spec
            kw = {"block_size": spec.block_size, "scale_fmt": spec.scale_fmt, "backend": spec.backend}
            if not self.ctx.is_distributed:
                y = ops.fused_moe(flat, routing.weights, routing.indices, *fused, **kw)
                return self._combine(flat, y).view(shape)
            # Expert parallel: only the (token, slot) pairs routed to this rank's experts, as top-1 rows.
            token, slot = torch.where((routing.indices >= self.lo) & (routing.indices < self.hi))  # (P,), (P,)
            order = torch.argsort(routing.indices[token, slot], stable=True)  # sum in expert order, as 1 rank does
            token, slot = token[order], slot[order]
            ids = (routing.indices[token, slot] - self.lo).unsqueeze(1)  # (P, 1) local expert ids
            out = ops.fused_moe(flat[token], routing.weights[token, slot].unsqueeze(1), ids, *fused, **kw)  # (P, H)
            return self._combine(flat, torch.zeros_like(flat).index_add_(0, token, out)).view(shape)
        first = self.experts[self.lo]
        if not (self.training or first.w1.is_fp8 or first.w1.fake_fp8 or self.row_tile):
            # inference on dense weights (batch-invariant mode keeps the per-expert loop for every size)
            few = routing.indices.numel() <= FEW_PAIRS
            routed = self._few_tokens(flat, routing) if few else self._sorted_pairs(flat, routing)
            return self._combine(flat, routed).view(shape)
        y = torch.zeros_like(flat)
        counts = torch.bincount(routing.indices.flatten(), minlength=self.n_experts).tolist()
        for e in range(self.lo, self.hi):
            if counts[e] == 0:
                continue
            token, slot = torch.where(routing.indices == e)  # (n_e,), (n_e,)
            w = routing.weights[token, slot].unsqueeze(-1).to(x.dtype)  # (n_e, 1)
            y.index_add_(0, token, self.experts[e](flat[token]) * w)
        return self._combine(flat, y).view(shape)

    def _few_tokens(self, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Routed experts for a few tokens (decoding): (N, hidden), summed in ascending expert order.

        One host read of the (N, K) choices replaces a device search per expert; an expert whose
        tokens are consecutive rows reads and writes them as views (no gather or scatter), and each
        expert is two GEMMs over its stacked weights (gate‖up, then down). Every token adds its
        experts' outputs to zero in ascending expert order, as the per-expert loop does.
        """
        chosen = routing.indices.tolist()  # (N, K) expert ids, one device→host read
        combine = torch.zeros(len(chosen), self.n_experts, dtype=flat.dtype, device=flat.device).scatter_(
            1, routing.indices, routing.weights.to(flat.dtype))  # (N, E): weight of expert e for token n, or 0
        y = torch.zeros_like(flat)
        for e in sorted({e for row in chosen for e in row if self.lo <= e < self.hi}):
            rows = [i for i, row in enumerate(chosen) if e in row]
            if rows[-1] - rows[0] + 1 == len(rows):  # consecutive rows: views
                span = slice(rows[0], rows[-1] + 1)
                x, w = flat[span], combine[span, e:e + 1]  # (n_e, hidden), (n_e, 1)
            else:
                x, w = flat[rows], combine[rows, e:e + 1]
            out = self._stacked_expert(x, e) * w  # (n_e, hidden)
            if rows[-1] - rows[0] + 1 == len(rows):
                y[span] += out
            else:
                y.index_add_(0, torch.tensor(rows, device=flat.device), out)
        return y

    def _sorted_pairs(self, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Routed experts for many tokens (prefill): (N, hidden), summed in ascending expert order.

        The (token, expert) pairs are sorted by expert once (stable: tokens ascending within an
        expert) and their rows gathered once; each expert then runs two GEMMs over its contiguous
        segment (gate‖up, then down) and one index_add sums every pair into its token in the sorted
        order, that is in ascending expert order, as the per-expert loop does.
        """
        k = routing.indices.shape[-1]
        ids = routing.indices.flatten()  # (N·K,) expert of each (token, slot) pair
        order = torch.argsort(ids, stable=True)  # (N·K,) pairs by expert, tokens ascending within one
        counts = torch.bincount(ids, minlength=self.n_experts).tolist()  # one device→host read
        start, stop = sum(counts[:self.lo]), sum(counts[:self.hi])  # this rank's experts' pairs
        order = order[start:stop]  # (P,)
        token = order // k  # (P,) token of each pair
        x = flat.index_select(0, token)  # (P, hidden): gathered once
        out = torch.empty_like(x)  # (P, hidden)
        lo = 0  # the segment of expert e starts here
        for e in range(self.lo, self.hi):
            n = counts[e]
            if n:
                out[lo:lo + n] = self._stacked_expert(x[lo:lo + n], e)  # (n, hidden)
                lo += n
        out *= routing.weights.flatten()[order].unsqueeze(-1).to(out.dtype)  # (P, hidden) · (P, 1)
        return torch.zeros_like(flat).index_add_(0, token, out)  # (N, hidden)

    def _stacked_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Routed expert e on rows x (n, hidden) from the stacked weights: two GEMMs (gate‖up, then
        down) → (n, hidden). The stack is rebuilt first if it no longer holds this expert's weights."""
        i = e - self.lo
        stack = self.dense_stack
        if stack is None or not stack.holds(i, _expert_params(self.experts[e], fp8=False)):
            stack = self._dense_stack()
        w13, w2 = stack.tensors  # (E_local, 2I, H), (E_local, H, I)
        p13, p2 = self.packed_experts[i] if self.packed_experts else (None, None)
        gate, up = ops.linear(x, w13[i], packed=p13).split([w2.shape[-1]] * 2, dim=-1)  # (n, I), (n, I)
        return ops.linear(F.silu(gate) * up, w2[i], packed=p2)  # (n, hidden)

    def _dense_stack(self) -> ExpertStack:
        """The local dense experts' weights stacked: (w13 (E_local, 2I, H), w2 (E_local, H, I)).

        The current stack while it holds every expert's parameters, else built from them now;
        every expert's parameters then view the stacked tensors, so no weight is held twice and
        training updates reach both. Packed copies of an earlier stack are dropped with it (they
        held the weights it held: pack again for new ones).
        """
        local = [self.experts[e] for e in range(self.lo, self.hi)]
        params = [_expert_params(ex, fp8=False) for ex in local]
        stack = self.dense_stack
        if stack is not None and all(stack.holds(i, ps) for i, ps in enumerate(params)):
            return stack
        self.dense_stack = self.packed_experts = None  # the old stack and its packed copies are freed first
        inter = local[0].w1.out_features
        w13 = torch.stack([torch.cat([w1.data, w3.data]) for w1, w3, _ in params])  # (E, 2I, H)
        w2 = torch.stack([w2.data for _, _, w2 in params])  # (E, H, I)
        for i, ex in enumerate(local):
            ex.w1.weight.data, ex.w3.weight.data, ex.w2.weight.data = w13[i, :inter], w13[i, inter:], w2[i]
        self.dense_stack = ExpertStack.of((w13, w2), [_expert_params(ex, fp8=False) for ex in local])
        return self.dense_stack

    def _combine(self, flat: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """Sum the routed outputs over ranks, then add the shared experts: (N, hidden)."""
        self.ctx.all_reduce(routed)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed

    def _fused_experts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The local experts' fp8 weights stacked for ops.fused_moe: (w13, w13_s, w2, w2_s).

        None when the experts are dense, or when moe_intermediate_size is not a multiple of the
        block (gate‖up blocks would straddle a scale boundary: the per-expert loop runs instead).
        Built on first use, and again when it no longer holds every expert's parameters; those
        then view the stacked tensors, so no weight is held twice.
        """
        first = self.experts[self.lo]
        block = first.w1.spec.block_size
        if not first.w1.is_fp8 or not first.w1.spec.w8a8 or first.w1.out_features % block:
            return None  # dense, weight-only FP8 (dequantized per GEMM by each Linear), or ragged blocks
        local = [self.experts[e] for e in range(self.lo, self.hi)]
        stack = self.fp8_stack
        if stack is None or not all(stack.holds(i, _expert_params(ex, fp8=True)) for i, ex in enumerate(local)):
            self.fp8_stack = None  # the old stack is freed first
            w13, w13_s, w2, w2_s = ops.stack_experts(  # (E_local, 2I, H), (E_local, 2I/b, H/b), (E_local, H, I), ...
                [(ex.w1.weight, ex.w1.scale) for ex in local], [(ex.w3.weight, ex.w3.scale) for ex in local],
                [(ex.w2.weight, ex.w2.scale) for ex in local], block)
            inter = first.w1.out_features
            for i, ex in enumerate(local):
                ex.w1.weight.data, ex.w3.weight.data = w13[i, :inter], w13[i, inter:]
                ex.w1.scale.data, ex.w3.scale.data = w13_s[i, : inter // block], w13_s[i, inter // block:]
                ex.w2.weight.data, ex.w2.scale.data = w2[i], w2_s[i]
            stack = self.fp8_stack = ExpertStack.of((w13, w13_s, w2, w2_s), [_expert_params(ex, fp8=True) for ex in local])
        return stack.tensors
