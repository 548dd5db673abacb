"""from_pretrained: build the model from an HF checkpoint directory, strictly.

Tensors are read through the index (a weight and its scale may sit in different shards), memory-
mapped, one at a time. FP8 weights are dequantized per 128×128 block for `weights="bf16"`, kept
with their scales for `weights="fp8"` (weight-only: dequantized per GEMM) and `"w8a8"`, and dense
checkpoints can be quantized at load.
Missing, unexpected or mis-shaped tensors, missing or mis-gridded scales and bad shards each raise
a one-line CheckpointError naming the tensor or file.

Under tensor/expert parallelism (`parallel=ctx`) each rank reads only its slices: from an HF
directory through safetensors slice reads (a weight's FP8 scale sliced with it, never the whole
tensor; dequantizing at load, a slice that cuts a scale block reads the blocks covering it), or
from the per-rank files of `convert shard` (detected by their manifest). A world size the config
cannot be split over is refused before any weight is read, and a rank that fails to load
makes every rank raise (a collective with a timeout, not a hang).
"""

from __future__ import annotations

import os

import torch

from deepseek_model import memory
from deepseek_model.config import ModelConfig
from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CONFIG_FILE, DTYPE_CODES, CheckpointError, CheckpointReader
from deepseek_model.checkpoint.schema import SPLIT_COLUMN, SPLIT_ROW
from deepseek_model.checkpoint.sharded import RankReader, is_sharded_dir, read_manifest
from deepseek_model.checkpoint.values import all_finite, nonfinite_mask
from deepseek_model.kernels import ops, reference
from deepseek_model.constants import FP8_DTYPE, block_grid, ceil_div
from deepseek_model.layers import LinearSpec
from deepseek_model.model import Transformer, check_max_seq_len
from deepseek_model.parallel import SINGLE_PROCESS, ParallelContext, check_splits
from deepseek_model.pretrained import resolve_checkpoint

WEIGHT_FORMATS = ("auto", "bf16", "fp8", "w8a8")
NATIVE_FP8_CAPABILITY = (8, 9)  # CUDA compute capability with FP8 tensor cores (Ada, Hopper and later)
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (or one of "
                             f"{sorted(_DTYPE_NAMES)}), got {dtype}")
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
    return _DTYPE_NAMES[dtype]


def _as_device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r}: this torch build or machine has no CUDA device")
    return dev


class _Loader:
    """Copies checkpoint tensors into a constructed model, checking every name, shape and scale.

    Args:
        reader: the checkpoint (whole tensors), or one rank's files of a sharded checkpoint.
        model: the constructed (possibly tensor-parallel) model.
        block: FP8 block size.
        scale_fmt: scale format used when quantizing dense weights at load.
        split_info: for a sharded checkpoint, the manifest's per-tensor split description; the
            reader then already holds this rank's slices (None: slice here).
    """

    def __init__(self, reader: CheckpointReader, model: Transformer, block: int, scale_fmt: str | None,
                 split_info: dict[str, dict] | None = None, check_values: bool = True):
        self.reader, self.model, self.block, self.scale_fmt = reader, model, block, scale_fmt
        self.split_info, self.check_values = split_info, check_values
        self.ctx: ParallelContext = model.ctx
        self.targets = model.state_dict(keep_vars=True)
        self.loaded: set[str] = set()

    def where(self, hf_name: str) -> str:
        return os.path.join(self.reader.path, self.reader.file_of(hf_name))

    def _shard_dim(self, hf_name: str) -> int | None:
        """The dimension this rank slices `hf_name` along (the schema's column/row rule), or None."""
        if not self.ctx.is_distributed:
            return None
        return schema.split_rule(hf_name)[1]

    def _read(self, hf_name: str, internal: str) -> torch.Tensor:
        """Read a tensor (this rank's slice of it when the target is split): a safetensors slice
        read, so a split tensor is never materialised whole."""
        dim = self._shard_dim(hf_name)
        if dim is None or self.split_info is not None:
            return self.reader.get(hf_name)
        full = self.reader.shape(hf_name)
        if full[dim] % self.ctx.world_size:
            raise CheckpointError(f"{self.where(hf_name)}: tensor '{hf_name}' dim {dim} ({full[dim]}) does not split "
                                  f"over world size {self.ctx.world_size}")
        part = full[dim] // self.ctx.world_size
        lo = self.ctx.rank * part
        sl = self.reader.get_slice(hf_name)
        return sl[lo:lo + part] if dim == 0 else sl[:, lo:lo + part]

    def _expected_shape(self, hf_name: str, target: torch.Tensor) -> tuple[int, ...]:
        shape = list(target.shape)
        dim = self._shard_dim(hf_name)
        if dim is not None and self.split_info is None:
            shape[dim] *= self.ctx.world_size
        return tuple(shape)

    def _check_split(self, hf_name: str, internal: str) -> None:
        """A sharded checkpoint must have split `hf_name` along the dimension this model splits."""
        if self.split_info is None:
            return
        info = self.split_info.get(hf_name, {})
        want = self._shard_dim(hf_name)
        got = info.get("dim") if info.get("split") in (SPLIT_COLUMN, SPLIT_ROW) else None
        if self.ctx.is_distributed and got != want:
            raise CheckpointError(f"{self.where(hf_name)}: tensor '{hf_name}' is split along dim {got} in the "
                                  f"manifest, the model splits it along dim {want}")

    def _check_shape(self, hf_name: str, internal: str, target: torch.Tensor) -> None:
        self._check_split(hf_name, internal)
        got, want = self.reader.shape(hf_name), self._expected_shape(hf_name, target)
        if got != want:
            raise CheckpointError(f"{self.where(hf_name)}: tensor '{hf_name}' has shape {list(got)}, the config "
                                  f"needs {list(want)}")

    def _checked_scale(self, hf_name: str) -> str:
        """The name of an fp8 weight's scale, after checking it exists with the weight's block grid."""
        s_name = schema.scale_name(hf_name)
        if s_name not in self.reader:
            raise CheckpointError(f"{self.where(hf_name)}: fp8 tensor '{hf_name}' has no scale '{s_name}'")
        grid = block_grid(self.reader.shape(hf_name), self.block)
        if self.reader.shape(s_name) != grid:
            raise CheckpointError(f"{self.where(s_name)}: scale '{s_name}' has shape {list(self.reader.shape(s_name))}, "
                                  f"the {self.block}x{self.block} block grid of its weight needs {list(grid)}")
        return s_name

    def _scale_for(self, hf_name: str, internal: str) -> torch.Tensor:
        return self._read(self._checked_scale(hf_name), internal).float()

    def _dequantized_slice(self, hf_name: str, internal: str, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """This rank's slice of an fp8 weight, dequantized with the scale blocks covering it.

        The slice need not start or end on a block: each element is multiplied by its own block's
        scale, exactly as dequantizing the whole weight and then slicing would (the product is
        formed in fp32, then rounded once to `dtype`).
        """
        full = self.reader.shape(hf_name)
        s_name = self._checked_scale(hf_name)
        part = full[dim] // self.ctx.world_size
        lo = self.ctx.rank * part
        b_lo, b_hi = lo // self.block, ceil_div(lo + part, self.block)
        sl = self.reader.get_slice(s_name)
        s = (sl[b_lo:b_hi] if dim == 0 else sl[:, b_lo:b_hi]).float()  # the covering blocks
        start = lo - b_lo * self.block
        s = s.repeat_interleave(self.block, dim=dim).narrow(dim, start, part)  # (.., part, ..) along dim
        other = 1 - dim
        s = s.repeat_interleave(self.block, dim=other).narrow(other, 0, full[other])  # elementwise scales
        return (self._read(hf_name, internal).float() * s).to(dtype)

    def load_tensor(self, hf_name: str) -> None:
        internal = schema.hf_to_internal(hf_name, self.model.cfg.num_hidden_layers)
        if internal is None:
            raise CheckpointError(f"{self.where(hf_name)}: unexpected tensor '{hf_name}'")
        target = self.targets.get(internal)
        if target is None:
            if internal.startswith("mtp.") and self.model.mtp is None and self.model.cfg.num_nextn_predict_layers:
                return  # MTP present in the checkpoint but not requested
            e = schema.expert_index(hf_name)
            if e is not None and self.ctx.is_distributed and e < self.model.cfg.n_routed_experts:
                return  # a routed expert that lives on another rank
            raise CheckpointError(f"{self.where(hf_name)}: unexpected tensor '{hf_name}'")
        self._check_shape(hf_name, internal, target)
        src_dtype = self.reader.dtype(hf_name)
        if not src_dtype.is_floating_point:
            raise CheckpointError(f"{self.where(hf_name)}: tensor '{hf_name}' is {str(src_dtype).replace('torch.', '')}; "
                                  f"weights must be floating point")
        dim = self._shard_dim(hf_name)
        if src_dtype == FP8_DTYPE and target.dtype != FP8_DTYPE and dim is not None and self.split_info is None:
            with torch.no_grad():  # a split that may cut scale blocks: dequantize with the covering ones
                target.copy_(self._dequantized_slice(hf_name, internal, dim, target.dtype))
            self._check_finite(hf_name, target)
            self.loaded.add(internal)
            return
        w = self._read(hf_name, internal)
        if src_dtype == FP8_DTYPE:
            s = self._scale_for(hf_name, internal)
        elif schema.scale_name(hf_name) in self.reader:
            raise CheckpointError(f"{self.where(hf_name)}: tensor '{hf_name}' is {src_dtype} but has a "
                                  f"scale '{schema.scale_name(hf_name)}' (only fp8 weights have scales)")
        else:
            s = None
        if s is not None:
            self._check_scale(schema.scale_name(hf_name), s)
        with torch.no_grad():
            if target.dtype == FP8_DTYPE:  # keep fp8 (quantizing a dense checkpoint at load)
                if s is None:
                    self._check_finite(hf_name, w)
                    w, s = ops.weight_quant(w.float(), self.block, self.scale_fmt)
                self._check_finite(hf_name, w)
                scale_internal = internal[: -len("weight")] + "scale"
                target.copy_(w)
                self.targets[scale_internal].copy_(s)
                self.loaded.add(scale_internal)
            elif s is not None:
                target.copy_(ops.weight_dequant(w, s, self.block, dtype=target.dtype))
            else:
                target.copy_(w.to(target.dtype))
        if target.dtype != FP8_DTYPE:
            self._check_finite(hf_name, target)
        self.loaded.add(internal)

    def _check_finite(self, hf_name: str, t: torch.Tensor) -> None:
        """Refuse NaN or infinite values (fp8: the NaN codes) unless the check was turned off."""
        if not self.check_values or all_finite(t):
            return
        bad = int(nonfinite_mask(t).sum())
        raise CheckpointError(f"{self.where(hf_name)}: tensor '{hf_name}' holds {bad} NaN or infinite "
                              f"values (check_values=False loads it anyway)")

    def _check_scale(self, s_name: str, s: torch.Tensor) -> None:
        """Block scales must be finite and >= 0 (0 is the scale of an all-zero block)."""
        if self.check_values and bool((~torch.isfinite(s) | (s < 0)).any()):
            raise CheckpointError(f"{self.where(s_name)}: scale '{s_name}' holds NaN, infinite or negative values "
                                  f"(check_values=False loads it anyway)")

    def run(self) -> None:
        for hf_name in self.reader.names():
            if schema.is_scale_name(hf_name):
                weight = schema.weight_of_scale(hf_name)
                if weight not in self.reader:
                    raise CheckpointError(f"{self.where(hf_name)}: scale '{hf_name}' has no weight '{weight}'")
                continue
            self.load_tensor(hf_name)
        for copy, main in (("mtp.embed.weight", "embed.weight"), ("mtp.head.weight", "head.weight")):
            if copy in self.targets and copy not in self.loaded and main in self.loaded:
                # A deduplicated checkpoint (convert --dedupe-mtp): the MTP module shares the main tensor.
                self.model.get_submodule(copy.rpartition(".")[0]).weight = self.targets[main]
                self.loaded.add(copy)
        missing = [n for n in self.targets if n not in self.loaded]
        if missing:
            hf = schema.internal_to_hf(missing[0], self.model.cfg.num_hidden_layers)
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.reader.path}: missing tensor '{hf}'{more}")


def _open(path: str | os.PathLike, ctx: ParallelContext) -> tuple[CheckpointReader, dict, dict | None]:
    """(reader, config dict, split_info): an HF directory, or this rank's files of a sharded one."""
    if not is_sharded_dir(path):
        reader = CheckpointReader(path)
        return reader, reader.config(), None
    manifest = read_manifest(path)
    if manifest["world_size"] != ctx.world_size:
        raise CheckpointError(f"{os.path.abspath(path)}: sharded for world size {manifest['world_size']}, this job "
                              f"has {ctx.world_size} ranks (re-shard with `convert shard --model-parallel "
                              f"{ctx.world_size}`, or load the HF directory)")
    reader = RankReader(path, manifest["ranks"][ctx.rank]["weight_map"])
    return reader, manifest["config"], manifest["tensors"]


def _is_fp8_checkpoint(reader: CheckpointReader, split_info: dict | None) -> bool:
    """Whether any tensor is float8_e4m3fn (from headers or the manifest; no data read)."""
    if split_info is not None:
        return any(info.get("dtype") == DTYPE_CODES[FP8_DTYPE] for info in split_info.values())
    return any(reader.dtype(n) == FP8_DTYPE for n in reader.names())


def native_fp8_gemm(device: torch.device | str, backend: str) -> bool:
    """Whether W8A8 runs on a native FP8 GEMM here: the Triton kernels on a CUDA GPU of compute
    capability 8.9 or later (elsewhere W8A8 would run through the slow torch twin)."""
    dev = torch.device(device)
    return (dev.type == "cuda" and ops.resolve_backend(backend, dev) == "triton"
            and torch.cuda.get_device_capability(dev) >= NATIVE_FP8_CAPABILITY)


def resolve_weights(weights: str, ckpt_fp8: bool, device: torch.device | str, backend: str) -> str:
    """The concrete weight mode: "auto" is "w8a8" for an FP8 checkpoint where a native FP8 GEMM
    runs, "fp8" (weight-only) for one elsewhere, and "bf16" for a dense checkpoint."""
    if weights != "auto":
        return weights
    if not ckpt_fp8:
        return "bf16"
    return "w8a8" if native_fp8_gemm(device, backend) else "fp8"


def _load(path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str, attn: str, weights: str,
          mtp: bool, max_seq_len: int | None, ctx: ParallelContext, backend: str, check_values: bool,
          batch_invariant: bool) -> Transformer:
    reader, config, split_info = _open(resolve_checkpoint(path), ctx)
    cfg = ModelConfig.from_dict(config, source=os.path.join(reader.path, CONFIG_FILE))
    mode = resolve_weights(weights, _is_fp8_checkpoint(reader, split_info), device, backend)
    use_fp8 = mode in ("fp8", "w8a8")
    quant = cfg.quantization
    block = quant.block_size[0] if quant else reference.BLOCK
    scale_fmt = quant.scale_fmt if quant else None
    # Before any weight is read: every split dimension divides, and FP8 storage splits fall on scale
    # blocks (dequantizing at load reads the blocks covering each rank's slice instead).
    check_splits(cfg, ctx.world_size, block if use_fp8 else None)
    spec = LinearSpec(dtype=dtype, device=device, fp8=use_fp8, w8a8=mode == "w8a8", block_size=block,
                      scale_fmt=scale_fmt, backend=backend, batch_invariant=batch_invariant)
    if torch.device(device).type == "cpu":  # before any parameter is allocated
        need = memory.model_bytes(cfg, dtype.itemsize, fp8=use_fp8, mtp=mtp, block=block) // ctx.world_size
        mapped = _mapped_bytes(reader) if memory.address_space_limited() else 0  # shards are memory-mapped
        memory.require(need + mapped, f"loading {reader.path} ({mode} weights, {str(dtype).replace('torch.', '')}"
                                      f"{', with its memory-mapped shards' if mapped else ''})")
    model = Transformer(cfg, spec, ctx, attn=attn, mtp=mtp, max_seq_len=max_seq_len)
    with reader:
        _Loader(reader, model, block, scale_fmt, split_info, check_values).run()
    return model.eval()


def _mapped_bytes(reader) -> int:
    """Bytes of the files a load maps: every shard its weight map names."""
    files = set(getattr(reader, "weight_map", {}).values())
    return sum(os.path.getsize(os.path.join(reader.path, f)) for f in files if os.path.isfile(os.path.join(reader.path, f)))


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                    device: torch.device | str = "cpu", attn: str = "absorb", weights: str = "auto",
                    mtp: bool = True, max_seq_len: int | None = None, parallel: ParallelContext | None = None,
                    backend: str = "torch", check_values: bool = True, batch_invariant: bool = False,
                    cpu_pack: bool = False) -> Transformer:
    """Load a DeepSeek-V2/V3 model from an HF checkpoint directory (or a `convert shard` output).

    Args:
        path: directory with config.json, model.safetensors.index.json and shards, or a directory
            written by `deepseek-model convert shard` (recognised by its tp_manifest.json; its
            world size must equal the job's), or the name of a shipped checkpoint
            ("mini-shakespeare", see `pretrained_path`).
        dtype: compute dtype (torch.float32 or torch.bfloat16, or their names).
        device: where the parameters live.
        attn: "absorb" (latent-space attention) or "naive".
        weights: "bf16" (dense weights in `dtype`, dequantized from FP8 at load), "fp8" (FP8
            storage, 1 byte per weight plus block scales, dequantized per GEMM into `dtype`:
            weight-only, the official `gemm_impl="bf16"` numerics), "w8a8" (FP8 storage and 1×128
            FP8 activations: the DeepSeek-V3 inference numerics), or "auto": "w8a8" for an FP8
            checkpoint where a native FP8 GEMM runs (CUDA, compute capability 8.9+, Triton
            backend), "fp8" for one elsewhere (a CPU), "bf16" for a dense checkpoint. "fp8" and
            "w8a8" quantize a dense checkpoint at load.
        mtp: build and load the MTP module when the checkpoint has one.
        max_seq_len: longest sequence accepted (default: max_position_embeddings).
        parallel: ParallelContext of a tensor/expert-parallel job (default: single process). Every
            rank must call this collectively; each reads only its own slices.
        backend: kernel backend for the fp8 ops ("torch" | "triton" | "auto").
        check_values: refuse weights holding NaN or infinities and block scales that are NaN,
            infinite or negative (False loads them as they are).
        batch_invariant: a row's logits are bit-identical whether it is computed alone or in a
            batch, prefilled at once or in chunks, verified as one token or with a draft (GEMMs on
            fixed 4-row tiles, attention per query over exactly its keys, no grouped expert op);
            greedy MTP speculative decoding then equals plain greedy in every weight mode and dtype.
        cpu_pack: also keep a oneDNN-blocked copy of every float32/bfloat16 projection weight, which
            inference GEMMs read instead (Transformer.pack_for_cpu): faster CPU prefill and batched
            decoding, and bfloat16 decoding, for a second copy of those weights in memory. CPU only;
            not with batch_invariant (its GEMMs run on fixed row tiles).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: a file or tensor is missing, unexpected, mis-shaped or corrupt.
        ConfigError: config.json is invalid.
        ParallelError: the model cannot be split over the world size (raised before any weight is
            read), or loading failed on another rank.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    check_max_seq_len(max_seq_len)  # before any file is read
    device = _as_device(device)
    if cpu_pack and device.type != "cpu":
        raise ValueError(f"cpu_pack=True packs weights for CPU GEMMs; the model is loaded on device={str(device)!r}")
    if cpu_pack and batch_invariant:
        raise ValueError("cpu_pack=True and batch_invariant=True exclude each other: batch-invariant GEMMs run "
                         "on fixed row tiles of the weights themselves")
    dtype = _as_dtype(dtype)
    ctx = parallel or SINGLE_PROCESS
    error, model = None, None
    try:
        model = _load(path, dtype, device, attn, weights, mtp, max_seq_len, ctx, backend, check_values,
                      batch_invariant)
        if cpu_pack:
            model.pack_for_cpu()
    except Exception as e:  # every rank must learn about a failure on any rank
        error = e
    ctx.check_all(error, "loading the checkpoint")
    return model
