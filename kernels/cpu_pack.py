"""oneDNN-blocked copies of CPU weights: the faster layout for float32 / bfloat16 GEMMs on a CPU.

F.linear hands a row-major (N, K) weight to the BLAS on every call. oneDNN instead reads a weight
it has reordered once into its own blocked layout, and on the CPUs this project is measured on
that GEMM is faster wherever the rows are few (one thread, 1024x512 weights: 16 rows 52 → 82
GFLOP/s float32 and 95 → 156 bfloat16; 128 rows 93 → 111 and 195 → 217; one bfloat16 row 9 → 15
GB/s of weight read). Where the CPU has AMX, oneDNN's bfloat16 GEMM runs on it.

A packed copy is a snapshot: it remembers which storage and which version of the weight (or of the
parameters it was stacked from) it was made from, and a weight that has since been replaced or
changed in place is never served from it. A change made through `.data` moves no version counter
and is not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACK_ROWS = 128  # the row count oneDNN is told to expect when it lays a weight out; the packed
# GEMM measured as fast at 4–1024 rows with this hint as with a hint equal to the rows
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# From how many rows a packed weight is used: one or two float32 rows stay on ops' narrow path
# (W·Xᵀ), which streams a float32 weight as fast or faster (1 thread, 1024x1024: 17.5 vs 13 GB/s at
# two rows); every bfloat16 row count is faster packed.
PACKED_MIN_ROWS = {torch.float32: 3, torch.bfloat16: 1}


def available() -> bool:
    """Whether this torch build can pack weights (oneDNN present)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packable(weight: torch.Tensor) -> bool:
    """Whether `weight` can have a packed copy: a 2-D float32/bfloat16 CPU tensor."""
    return weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and weight.numel() > 0


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    """(data pointer, in-place version counter) of `t`; the version is -1 for an inference tensor
    (made under torch.inference_mode, it keeps none)."""
    return t.data_ptr(), -1 if t.is_inference() else t._version


@dataclass(frozen=True)
class Snapshot:
    """What a derived copy of weights was made from, to tell later whether it still holds them.

    Attributes:
        sources: the tensors whose values the copy holds: a weight, or the parameters whose
            storage it views (an expert's gate and up projections stacked into one weight).
        stamps: (data pointer, in-place version) of each source then (version -1: an inference
            tensor, which keeps none; its storage is still checked).
    """

    sources: tuple[torch.Tensor, ...]
    stamps: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, sources: tuple[torch.Tensor, ...]) -> Snapshot:
        """The state of `sources` now."""
        return cls(tuple(sources), tuple(_stamp(t) for t in sources))

    def fresh(self) -> bool:
        """Whether no source has been replaced or changed in place since."""
        return all(_stamp(t) == st for t, st in zip(self.sources, self.stamps))

    def usable(self) -> bool:
        """Whether the copy may stand in for its sources now: fresh, and no gradient is wanted
        through them (a copy has no backward)."""
        return self.fresh() and not (torch.is_grad_enabled() and any(t.requires_grad for t in self.sources))


@dataclass(frozen=True)
class PackedWeight:
    """A oneDNN-blocked copy of one (N, K) weight and the state of what it was made from.

    Attributes:
        blocked: the opaque oneDNN tensor.
        weight_ptr: data pointer of the packed weight when packed.
        origin: the weight (or the parameters it views) when packed.
        shape: the weight's (N, K).
        dtype: the weight's dtype.
    """

    blocked: torch.Tensor
    weight_ptr: int
    origin: Snapshot
    shape: tuple[int, int]
    dtype: torch.dtype

    @classmethod
    def of(cls, weight: torch.Tensor, sources: tuple[torch.Tensor, ...] | None = None) -> PackedWeight:
        """Pack `weight` (see `packable`).

        Args:
            weight: the (N, K) weight.
            sources: the tensors a change of which changes `weight` (default: the weight itself);
                give the parameters when `weight` is a view into storage they share, since an
                in-place update of a parameter moves only that parameter's version counter.
        """
        if not packable(weight):
            raise ValueError(f"cannot pack a {tuple(weight.shape)} {weight.dtype} weight on {weight.device}: "
                             "packing takes 2-D float32/bfloat16 CPU weights")
        w = weight.detach()
        origin = Snapshot.of((weight,) if sources is None else tuple(sources))
        blocked = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS)
        return cls(blocked, w.data_ptr(), origin, tuple(w.shape), w.dtype)

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of a packed model is unpacked: its weights live elsewhere, so this copy would
        never serve them (oneDNN's opaque tensors cannot be copied either); pack the copy again."""
        return None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed copy (the weight's own size; oneDNN pads little)."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def serves(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether y = x·weightᵀ may be computed from this copy: the weight is still the one packed
        (same storage, no source replaced or changed in place), x matches its dtype on the CPU with
        enough rows, and no gradient is needed, through x or the sources (the packed GEMM has no
        backward)."""
        if weight.data_ptr() != self.weight_ptr or not self.origin.usable():
            return False
        if x.device.type != "cpu" or x.dtype != self.dtype or weight.dtype != self.dtype:
            return False
        if x.dim() == 0 or x.shape[-1] != self.shape[1]:
            return False
        if x.numel() // self.shape[1] < PACKED_MIN_ROWS[self.dtype]:
            return False
        return not (torch.is_grad_enabled() and x.requires_grad)  # the sources' gradients: origin.usable()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x·Wᵀ (+ bias) from the blocked copy: [..., K] → [..., N] in x.dtype."""
        b = None if bias is None else bias.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.blocked, b, "none", [], "")
