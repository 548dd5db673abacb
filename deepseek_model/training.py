"""Training DeepSeek-V3 style: CE + MTP loss, the sequence-wise balance loss, the bias update.

Load balance follows the report (§2.1.2, §4.2): no auxiliary loss steers the experts; instead each
router's fp32 correction bias (used for selection only, never trained by gradients) is nudged after
every optimizer step, bias_e += γ·sign(mean_load − load_e), from the tokens each expert received
during that step (`BiasUpdater`). A tiny sequence-wise balance loss α·Σ_e f_e·P_e guards against
extreme imbalance within one sequence (`sequence_balance_loss`), and the MTP module adds
λ·CE(mtp_logits, t_{i+2}) (`mtp_loss`). FP8 GEMMs are emulated by `LinearSpec(fp8_training=True)`
(deepseek_model.fp8_training). `train` is a small AdamW loop over these pieces.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deepseek_model import memory
from deepseek_model.config import ModelConfig
from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.writer import DEFAULT_SHARDS, write_checkpoint
from deepseek_model.layers import LinearSpec
from deepseek_model.model import ModelOutput, RouterOutput, Transformer
from deepseek_model.moe import Gate, MoE
from deepseek_model.training_data import Batch

GAMMA = 1e-3  # bias update speed (report: 0.001, then 0 for the last 500B tokens)
ALPHA = 1e-4  # sequence-wise balance loss weight
MTP_LAMBDA = 0.3  # MTP loss weight (report: 0.3, then 0.1)
IGNORE_INDEX = -100  # target value ignored by the cross-entropies
LR = 3e-3
MIN_LR_RATIO = 0.1  # cosine decay ends at LR · MIN_LR_RATIO
WARMUP_STEPS = 20
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
OUTPUT_PROJECTIONS = ("attn.wo", ".w2")  # residual-branch outputs, initialised smaller (GPT-2 scheme)


# --------------------------------------------------------------------------- model set-up
def init_weights(model: Transformer, seed: int = 0) -> None:
    """Initialise a freshly built model in place, deterministically.

    Norm weights 1; embeddings N(0, 1); linears and heads N(0, 1/fan_in), with the residual output
    projections (attention wo, MLP/expert w2) further scaled by 1/sqrt(2·layers); router biases 0.

    Args:
        model: a Transformer built with dense (non-fp8) weights.
        seed: RNG seed.
    """
    gen = torch.Generator().manual_seed(seed)
    depth_scale = 1.0 / math.sqrt(2 * (model.cfg.num_hidden_layers + model.has_mtp))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                value = torch.ones(p.shape)
            elif name.endswith("embed.weight"):
                value = torch.randn(p.shape, generator=gen)
            else:
                value = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
                if any(s in name for s in OUTPUT_PROJECTIONS):
                    value = value * depth_scale
            p.copy_(value.to(device=p.device, dtype=p.dtype))
        for module in model.modules():
            if isinstance(module, Gate) and module.bias is not None:
                module.bias.zero_()


def tie_mtp_weights(model: Transformer) -> None:
    """Share the main embedding and output head with the MTP module (as in DeepSeek-V3 training)."""
    if model.mtp is not None:
        model.mtp.embed.weight = model.embed.weight
        model.mtp.head.weight = model.head.weight


def build_model(cfg: ModelConfig, seed: int = 0, fp8: bool = False, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, mtp: bool = True) -> Transformer:
    """A randomly initialised model for training (naive MLA, tied MTP embedding/head).

    Args:
        cfg: architecture.
        seed: initialisation seed.
        fp8: emulate FP8 GEMMs in the linears (fp32 master weights).
        device: where parameters live.
        dtype: master-weight dtype.
        mtp: build the MTP module when the config has one.

    Returns:
        The model in train mode.
    """
    spec = LinearSpec(dtype=dtype, device=device, fp8_training=fp8)
    model = Transformer(cfg, spec, attn="naive", mtp=mtp)
    init_weights(model, seed)
    tie_mtp_weights(model)
    return model.train()


def forward_train(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Main logits and MTP logits from one pass of the trunk.

    Args:
        model: the Transformer.
        ids: (B, T) token ids.

    Returns:
        (logits (B, T, V), mtp_logits (B, T-1, V) or None without an MTP module), fp32.
    """
    if model.mtp is None:
        return model(ids), None
    out = model(ids, outputs={"mtp_logits"})  # the inference forward, MTP over the same trunk pass
    return out.logits, out.mtp_logits


def forward_train_outputs(model: Transformer, ids: torch.Tensor) -> ModelOutput:
    """The training forward: logits, MTP logits (when the model has the module) and every MoE
    layer's routing (scores keep their graph for the balance loss), all returned."""
    return model(ids, outputs={"router", "mtp_logits"} if model.mtp is not None else {"router"})


# --------------------------------------------------------------------------- losses
def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document numbers from packed position ids that restart at 0 for each document."""
    return (position_ids == 0).long().cumsum(dim=1)  # (B, T)


def shifted_targets(ids: torch.Tensor, shift: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets t_{i+shift} for positions i = 0..T-shift-1, IGNORE_INDEX across document boundaries.

    Args:
        ids: (B, T) token ids.
        shift: how far ahead the target is (1: next token, 2: MTP).
        doc_ids: optional (B, T) document numbers; a target whose window i..i+shift leaves the
            document of position i is ignored.

    Returns:
        (B, T-shift) int64 targets.
    """
    if shift < 1:
        raise ValueError(f"shift must be >= 1, got {shift}")
    t = ids.shape[1] - shift
    targets = ids[:, shift:].clone()  # (B, T-shift)
    if doc_ids is not None:
        crosses = torch.zeros_like(targets, dtype=torch.bool)
        for j in range(1, shift + 1):
            crosses |= doc_ids[:, j:j + t] != doc_ids[:, :t]
        targets[crosses] = IGNORE_INDEX
    return targets


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored targets (0 when all are ignored); logits (B, T', V), targets (B, T')."""
    flat = logits.reshape(-1, logits.shape[-1])  # (B·T', V)
    if not (targets != IGNORE_INDEX).any():
        return flat.sum() * 0.0
    return F.cross_entropy(flat.float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, i] predicts ids[:, i+1].

    Args:
        logits: (B, T, V).
        ids: (B, T).
        doc_ids: optional (B, T) document numbers of packed sequences.
        position_ids: optional (B, T) positions restarting at 0 per document (used when doc_ids
            is not given).
    """
    if doc_ids is None and position_ids is not None:
        doc_ids = document_ids(position_ids)
    return _masked_ce(logits[:, :-1], shifted_targets(ids, 1, doc_ids))


def mtp_loss(mtp_logits: torch.Tensor, ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, lam: float = MTP_LAMBDA) -> torch.Tensor:
    """λ·CE(mtp_logits, t_{i+2}): row i (built from h_i and t_{i+1}) predicts ids[:, i+2].

    The last MTP row (i = T-2) has no target inside the sequence; rows whose window i..i+2 crosses
    a document boundary are ignored.

    Args:
        mtp_logits: (B, T-1, V) from `model.mtp_logits(ids)` or `forward_train`.
        ids: (B, T).
        doc_ids: optional (B, T) document numbers.
        position_ids: optional (B, T) positions restarting at 0 per document.
        lam: the weight λ.
    """
    if mtp_logits.shape[1] != ids.shape[1] - 1:
        raise ValueError(f"mtp_logits must have T-1 = {ids.shape[1] - 1} rows, got {mtp_logits.shape[1]}")
    if doc_ids is None and position_ids is not None:
        doc_ids = document_ids(position_ids)
    return lam * _masked_ce(mtp_logits[:, :-1], shifted_targets(ids, 2, doc_ids))


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Sequence-wise balance loss α·Σ_e f_e·P_e, averaged over sequences.

    f_e = E/(K·T)·(tokens of the sequence routed to e) (no gradient); P_e = mean over the
    sequence of s'_e = s_e / Σ_e' s_e' (differentiable through the scores).

    Args:
        scores: (B, T, E) unbiased router scores (sigmoid or softmax).
        indices: (B, T, K) selected experts.
        alpha: the weight α.

    Returns:
        Scalar loss.
    """
    b, t, e = scores.shape
    k = indices.shape[-1]
    counts = torch.zeros(b, e, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, indices.reshape(b, t * k), torch.ones(b, t * k, dtype=scores.dtype,
                                                                 device=scores.device))  # (B, E)
    f = counts * (e / (k * t))  # (B, E)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return alpha * (f * p).sum(dim=-1).mean()


def moe_layers(model: torch.nn.Module) -> list[tuple[str, MoE]]:
    """(name, module) of every MoE layer (the MTP block's included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def balance_loss(router: Sequence[RouterOutput], alpha: float = ALPHA) -> torch.Tensor:
    """Sum over MoE layers of the sequence-wise balance loss of one forward's routing.

    Args:
        router: the `router` of a `model(ids, outputs={"router", ...})` in train mode (its scores
            carry the graph).
        alpha: the weight α.

    Raises:
        ValueError: no MoE layer was run (empty `router`).
    """
    if not router:
        raise ValueError("router: no MoE routing in this forward (ask the model for outputs={'router'})")
    return torch.stack([sequence_balance_loss(r.scores, r.indices, alpha) for r in router]).sum()


# --------------------------------------------------------------------------- bias update
@dataclass
class LoadStats:
    """Expert load of one router over one optimizer step.

    Attributes:
        counts: (E,) tokens routed to each expert (summed over micro-batches and ranks).
        max_over_mean: max load / mean load (1 = perfectly balanced).
        cv: coefficient of variation, std / mean (population std).
    """

    counts: torch.Tensor
    max_over_mean: float
    cv: float


def load_stats(counts: torch.Tensor) -> LoadStats:
    """Statistics of a (E,) load vector."""
    c = counts.double()
    mean = c.mean().item()
    if mean == 0:
        return LoadStats(counts, 0.0, 0.0)
    return LoadStats(counts, c.max().item() / mean, c.std(unbiased=False).item() / mean)


class BiasUpdater:
    """The auxiliary-loss-free balancer: bias_e += γ·sign(mean_load − load_e) at each optimizer step.

    `record(router)` adds the expert counts of a training forward's returned routing (they
    accumulate over micro-batches; a forward that is not recorded — an evaluation, sampling — does
    not count); `step()` all-reduces them over `group` (data-parallel ranks) when given, updates the
    biases, and resets the counts. Nothing is set on the model's modules.

    Args:
        model: the model whose Gates to balance.
        gamma: bias update speed γ (0 records statistics only).
        recenter: subtract the mean of each update, keeping Σ bias fixed (torchtitan).
        group: data-parallel process group to sum counts over (None: this process only).
    """

    def __init__(self, model: torch.nn.Module, gamma: float = GAMMA, recenter: bool = False, group: Any = None):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma, self.recenter, self.group = gamma, recenter, group
        self.gates = {n.removesuffix(".gate"): m for n, m in model.named_modules() if isinstance(m, Gate)}
        self.counts = {name: torch.zeros(gate.n_experts, dtype=torch.int64, device=gate.weight.device)
                       for name, gate in self.gates.items()}  # (E,) tokens routed per expert since step()
        self.last_stats: dict[str, LoadStats] = {}

    def record(self, router: Sequence[RouterOutput]) -> None:
        """Count the tokens each expert received in one forward (its returned routing)."""
        with torch.no_grad():
            for r in router:
                if r.layer not in self.counts:
                    raise ValueError(f"router: layer '{r.layer}' is not a router of this model")
                self.counts[r.layer] += torch.bincount(r.indices.flatten(), minlength=self.counts[r.layer].numel())

    def step(self) -> dict[str, LoadStats]:
        """Apply the update from the counts since the last step, reset them, return their statistics."""
        stats = {}
        with torch.no_grad():
            for name, gate in self.gates.items():
                counts = self.counts[name]
                if self.group is not None:
                    dist.all_reduce(counts, group=self.group)
                load = counts.double()  # (E,)
                stats[name] = load_stats(counts.clone())
                if gate.bias is not None and self.gamma > 0:
                    delta = self.gamma * torch.sign(load.mean() - load)  # (E,)
                    if self.recenter:
                        delta = delta - delta.mean()
                    gate.bias += delta.to(gate.bias.dtype)
                counts.zero_()
        self.last_stats = stats
        return stats

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run `step()` after every `optimizer.step()`; returns the hook handle (`.remove()` detaches)."""
        return optimizer.register_step_post_hook(lambda *_: self.step())


# --------------------------------------------------------------------------- the loop
class Corpus(Protocol):
    """Anything that draws packed batches."""

    vocab_size: int

    def sample(self, batch: int, seq_len: int, gen: torch.Generator) -> Batch: ...


class TrainingDiverged(ValueError):
    """A training step met a NaN or infinite loss or gradient norm (the weights are left as they were)."""


def _target_shares(batches: list[Batch], shift: int) -> list[float]:
    """Each micro-batch's share of the counted targets `shift` ahead (1/n each when none are counted)."""
    counts = [int((shifted_targets(b.ids, shift, b.doc_ids) != IGNORE_INDEX).sum()) for b in batches]
    total = sum(counts)
    return [c / total for c in counts] if total else [1.0 / len(batches)] * len(batches)


@dataclass
class TrainConfig:
    """Hyper-parameters of `train`."""

    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 64  # tokens per sequence
    micro_batches: int = 1  # micro-batches accumulated per step
    lr: float = LR  # peak learning rate (linear warm-up, cosine decay to lr·MIN_LR_RATIO)
    warmup: int = WARMUP_STEPS  # warm-up steps
    weight_decay: float = WEIGHT_DECAY  # AdamW decoupled weight decay (matrices only)
    grad_clip: float = GRAD_CLIP  # max global gradient norm
    gamma: float = GAMMA  # bias update speed
    recenter: bool = False  # zero-mean bias updates
    alpha: float = ALPHA  # sequence-wise balance loss weight
    mtp_lambda: float = MTP_LAMBDA  # MTP loss weight
    seed: int = 0  # data seed
    log_every: int = 10  # steps between log records
    eval_batches: int = 4  # held-out batches for the final evaluation


@dataclass
class TrainResult:
    """What `train` measured.

    Attributes:
        history: one record per step (loss terms, lr, grad norm, per-layer load statistics).
        eval_loss: mean next-token CE on held-out batches after training.
        eval_mtp_loss: mean (unweighted) MTP CE on the same batches (None without MTP).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    eval_loss: float = float("nan")
    eval_mtp_loss: float | None = None


def check_rates(lr: float, gamma: float, alpha: float, mtp_lambda: float, error: type[ValueError] = ValueError) -> None:
    """Raise `error` naming the command-line flag of the first bad rate: lr must be > 0, the bias
    speed γ and the loss weights α and λ >= 0, all finite (nan included)."""
    for name, value in (("gamma", gamma), ("alpha", alpha), ("mtp_lambda", mtp_lambda), ("lr", lr)):
        if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
            raise error(f"--{name.replace('_', '-')} must be a {'positive' if name == 'lr' else 'non-negative'} "
                        f"number, got {value:g}")


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr, then a cosine from tc.lr towards tc.lr·MIN_LR_RATIO, which it
    would reach one step after the last (the last step runs slightly above it: 0.134·lr of a
    10-step run, 0.101·lr of 50 steps).

    The warm-up is capped at a fifth of the run, so short runs reach the peak rate.
    """
    warmup = min(tc.warmup, max(1, tc.steps // 5))
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, tc.steps - warmup)
    return tc.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norms unregularised)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=BETAS)


def _step_record(step: int, terms: dict[str, float], lr: float, grad_norm: float,
                 stats: dict[str, LoadStats]) -> dict[str, Any]:
    layers = {n: {"max_over_mean": s.max_over_mean, "cv": s.cv} for n, s in stats.items()}
    rec: dict[str, Any] = {"step": step, **terms, "lr": lr, "grad_norm": grad_norm, "load": layers}
    if layers:
        rec["max_over_mean"] = sum(v["max_over_mean"] for v in layers.values()) / len(layers)
        rec["cv"] = sum(v["cv"] for v in layers.values()) / len(layers)
    return rec


def evaluate(model: Transformer, batches: list[Batch]) -> tuple[float, float | None]:
    """Mean next-token CE and (unweighted) MTP CE over `batches`, without gradients or bias updates."""
    was_training = model.training
    model.eval()
    lm, mt = [], []
    with torch.no_grad():
        for b in batches:
            logits, mtp = forward_train(model, b.ids)
            lm.append(lm_loss(logits, b.ids, b.doc_ids).item())
            if mtp is not None:
                mt.append(mtp_loss(mtp, b.ids, b.doc_ids, lam=1.0).item())
    model.train(was_training)
    return sum(lm) / len(lm), (sum(mt) / len(mt) if mt else None)


def train_step(model: Transformer, opt: torch.optim.Optimizer, balancer: BiasUpdater, corpus: Corpus,
               tc: TrainConfig, step: int, gen: torch.Generator) -> dict[str, Any]:
    """One optimizer step: `tc.micro_batches` forwards and backwards, clipping, AdamW, bias update.

    The loss of a micro-batch is CE + λ·MTP CE + α·Σ_layers sequence balance loss; the learning rate
    follows `lr_at(step, tc)`.

    Args:
        model: the Transformer in train mode.
        opt: its optimizer (from `make_optimizer`).
        balancer: the bias updater attached to the model's routers.
        corpus: batch source.
        tc: hyper-parameters.
        step: the step number (0-based), for the learning-rate schedule and the record.
        gen: generator the batches are drawn with.

    Returns:
        The step record (loss terms, lr, gradient norm, per-layer load statistics).
    """
    device = model.inv_freq.device
    lr = lr_at(step, tc)
    for g in opt.param_groups:
        g["lr"] = lr
    terms = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
    batches = [corpus.sample(tc.batch_size, tc.seq_len, gen) for _ in range(tc.micro_batches)]
    # Each micro-batch's CE is a mean over its own counted targets: weighted by its share of all of
    # them, the accumulated loss is the one large batch's (documents make the counts unequal).
    weights = {shift: _target_shares(batches, shift) for shift in (1, 2)}  # shift 1: next token, 2: MTP
    for i, batch in enumerate(batches):
        ids, docs = batch.ids.to(device), batch.doc_ids.to(device)
        out = forward_train_outputs(model, ids)
        balancer.record(out.router)
        lm = lm_loss(out.logits, ids, docs)
        mt = mtp_loss(out.mtp_logits, ids, docs, lam=tc.mtp_lambda) if out.mtp_logits is not None else lm * 0.0
        bal = balance_loss(out.router, tc.alpha) if out.router else lm * 0.0
        parts = {"lm_loss": lm * weights[1][i], "mtp_loss": mt * weights[2][i], "balance_loss": bal / tc.micro_batches}
        loss = parts["lm_loss"] + parts["mtp_loss"] + parts["balance_loss"]
        if not bool(torch.isfinite(loss)):
            raise TrainingDiverged(f"step {step}: the loss is {loss.item()} (next-token {lm.item():.4g}, MTP "
                                   f"{mt.item():.4g}, balance {bal.item():.4g}) at learning rate {lr:.3g}: training "
                                   f"diverged; nothing was updated or saved (try a lower --lr)")
        loss.backward()
        for key, v in parts.items():
            terms[key] += v.item()
        terms["loss"] += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).item()
    if not math.isfinite(grad_norm):  # clipping by a NaN norm would write NaN into every weight
        raise TrainingDiverged(f"step {step}: the gradient norm is {grad_norm} at learning rate {lr:.3g}: training "
                               f"diverged; nothing was updated or saved (try a lower --lr)")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return _step_record(step, terms, lr, grad_norm, balancer.step())


def train(model: Transformer, corpus: Corpus, tc: TrainConfig, log: Callable[[dict[str, Any]], None] | None = None,
          group: Any = None) -> TrainResult:
    """Train `model` on batches from `corpus` (`train_step` tc.steps times).

    Args:
        model: a Transformer (e.g. from `build_model`); trained in place.
        corpus: batch source.
        tc: hyper-parameters.
        log: called with the record of every tc.log_every-th step and of the last step.
        group: process group over which the expert counts of the bias update are summed (None: this
            process only). Gradients are not reduced over it, and every rank draws the same batches
            from tc.seed: a caller that trains data-parallel averages the gradients and splits the data itself.

    Returns:
        The history and the held-out losses.
    """
    for name in ("steps", "micro_batches", "batch_size"):
        if getattr(tc, name) < 1:
            raise ValueError(f"tc.{name} must be >= 1, got {getattr(tc, name)}")
    shortest, why = (3, "MTP targets are two ahead") if model.mtp is not None else (2, "targets are one ahead")
    if tc.seq_len < shortest:
        raise ValueError(f"tc.seq_len must be >= {shortest} ({why}), got {tc.seq_len}")
    memory.require(memory.training_bytes(model.cfg, sum(p.numel() for p in model.parameters()), tc.batch_size,
                                         tc.seq_len),
                   f"training with micro-batches of {tc.batch_size} x {tc.seq_len} tokens (weights, AdamW state, "
                   f"activations)")
    gen = torch.Generator().manual_seed(tc.seed)
    eval_gen = torch.Generator().manual_seed(tc.seed + 1_000_003)
    held_out = [corpus.sample(tc.batch_size, tc.seq_len, eval_gen) for _ in range(tc.eval_batches)]
    opt = make_optimizer(model, tc)
    balancer = BiasUpdater(model, tc.gamma, tc.recenter, group)
    result = TrainResult()
    model.train()
    for step in range(tc.steps):
        rec = train_step(model, opt, balancer, corpus, tc, step, gen)
        result.history.append(rec)
        if log is not None and (step % tc.log_every == 0 or step == tc.steps - 1):
            log(rec)
    result.eval_loss, result.eval_mtp_loss = evaluate(model, held_out)
    return result


# --------------------------------------------------------------------------- checkpoints
def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's tensors under their HF names (CPU copies; router biases stay fp32).

    Args:
        model: the Transformer (dense weights).
        dtype: storage dtype of the weights.
    """
    out = {}
    for name, t in model.state_dict().items():
        hf = schema.internal_to_hf(name, model.cfg.num_hidden_layers)
        keep_fp32 = schema.match(hf).family.keep_fp32
        out[hf] = t.detach().to(device="cpu", dtype=torch.float32 if keep_fp32 else dtype).clone()
    return out


def save_checkpoint(model: Transformer, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    num_shards: int = DEFAULT_SHARDS) -> str:
    """Write the model as an HF checkpoint directory (config.json, index, safetensors shards).

    `deepseek_model.from_pretrained(out_dir, dtype=dtype)` loads it back; with the same attention
    mode the logits are identical.

    Args:
        model: the Transformer.
        out_dir: target directory.
        dtype: torch.float32 (exact master weights) or torch.bfloat16.
        num_shards: number of shards.

    Returns:
        The directory.
    """
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype)
    if dtype_name is None:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    cfg = model.cfg.replace(quantization=None, torch_dtype=dtype_name,
                            num_nextn_predict_layers=model.cfg.num_nextn_predict_layers if model.has_mtp else 0)
    return write_checkpoint(out_dir, hf_state_dict(model, dtype), cfg.to_dict(), num_shards=num_shards)
