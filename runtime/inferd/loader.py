"""Load checkpoint tensors into a model: a loop over tensors, each parameter loading itself.

On CUDA, host tensors travel through a small ring of pinned staging buffers: the CPU fills one
slot while the copy engine drains the previous one, so host memory stays bounded by the ring, not
the model, and the transfer runs at pinned-memory speed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from inferd.layers.linear import default_weight_loader


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    files = _checkpoint_files(Path(model_dir))
    unreadable = [str(f) for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise PermissionError(
            f"the model files {unreadable} cannot be read by uid {os.getuid()}: make them readable by the "
            "service user (e.g. chmod 0640 and group of the service user, or 0644)"
        )
    return files


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"the safetensors index lists files that are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class PinnedStager:
    """Copies host tensors to one CUDA device through `slots` pinned buffers of `slot_bytes`."""

    def __init__(self, device: torch.device, slot_bytes: int = 64 << 20, slots: int = 2):
        self.device = device
        self.slot_bytes = slot_bytes
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.done: list[torch.cuda.Event | None] = [None] * slots
        self.stream = torch.cuda.Stream(device)
        self.next = 0

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        src = tensor.contiguous().reshape(-1).view(torch.uint8)
        current = torch.cuda.current_stream(self.device)
        out = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
        # `out` may reuse memory that work queued on the current stream still reads (the last
        # tensor, freed once its weight loader queued a copy from it): the copy stream waits for
        # that work before writing. Without this wait a second model loaded in one process came
        # out with other tensors' bytes in its weights, depending on timing.
        self.stream.wait_stream(current)
        for off in range(0, src.numel(), self.slot_bytes):
            n = min(self.slot_bytes, src.numel() - off)
            i = self.next
            self.next = (i + 1) % len(self.slots)
            if self.done[i] is not None:
                self.done[i].synchronize()  # the copy engine has finished reading this slot
            self.slots[i][:n].copy_(src[off : off + n])
            with torch.cuda.stream(self.stream):
                out[off : off + n].copy_(self.slots[i][:n], non_blocking=True)
                self.done[i] = torch.cuda.Event()
                self.done[i].record(self.stream)
        current.wait_stream(self.stream)
        return out.view(tensor.dtype).reshape(tensor.shape)


def load_weights(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    total_bytes: int | None = None,
    progress: bool | None = None,
) -> None:
    """`progress`: None shows a bar only when stderr is a terminal (never in a service's journal)."""
    from tqdm import tqdm

    mapping: dict = getattr(model, "packed_modules_mapping", {})
    ignored = getattr(model, "ignored_checkpoint_tensors", ())
    # Whole layers the model does not run (DeepSeek-V3's multi-token-prediction layer).
    skipped_prefixes = getattr(model, "ignored_checkpoint_prefixes", ())
    # A model-specific name -> (parameter, shard id) rule, e.g. routed experts into stacked tensors.
    custom_target = getattr(model, "checkpoint_target", lambda name: None)
    # fp8 checkpoints with block scales (DeepSeek-V3/R1): dequantized here, the CPU's form.
    if getattr(model, "weight_block_size", None):
        tensors = dequantize_fp8_blocks(tensors, model.weight_block_size)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(dict(model.named_parameters()))
    loaded: set[str] = set()
    device = next(model.parameters()).device
    stager = PinnedStager(device) if device.type == "cuda" else None
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", disable=not enabled)
    for name, tensor in tensors:
        bar.update(tensor.numel() * tensor.element_size())
        if any(name.endswith(s) for s in ignored) or name.startswith(skipped_prefixes):
            continue
        shard_id = None
        target = name
        custom = custom_target(name)
        if custom is not None:
            target, shard_id = custom
        for fragment, (fused, shard) in mapping.items():
            if custom is None and f".{fragment}." in name:
                target, shard_id = name.replace(f".{fragment}.", f".{fused}."), shard
                break
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no model parameter: is this the right architecture?")
        loader = getattr(param, "weight_loader", None)
        if stager is not None and tensor.device.type == "cpu" and tensor.numel():
            tensor = stager.to_device(tensor)
        try:
            if loader is None:
                default_weight_loader(param, tensor)
            elif shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
        loaded.add(target)
    bar.close()
    # A tied lm_head shares the embedding's parameter and is not in the checkpoint.
    aliases = {n for n, p in params.items() if n not in expected}
    missing = sorted(expected - loaded - aliases)
    if missing:
        raise ValueError(f"checkpoint lacks tensors for: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """An e4m3 weight [N, K] times its per-block scales [ceil(N/bn), ceil(K/bk)], in float32
    (DeepSeek-V3's fp8 checkpoints: `weight_scale_inv` multiplies, despite its name)."""
    n, k = weight.shape
    bn, bk = block
    rows, cols = (n + bn - 1) // bn, (k + bk - 1) // bk
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {n}x{k} weight in {bn}x{bk} blocks needs {(rows, cols)}"
        )
    scales = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return weight.float() * scales


def dequantize_fp8_blocks(
    tensors: Iterator[tuple[str, torch.Tensor]], block: tuple[int, int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors with each fp8 `X.weight` and its `X.weight_scale_inv` joined into one
    float32 weight (the CPU path; the pair may come in either order, or in different files)."""
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name.endswith(".weight_scale_inv"):
            base = name.removesuffix("_scale_inv")
            if base in weights:
                yield base, dequantize_fp8_block(weights.pop(base), tensor, block)
            else:
                scales[base] = tensor
        elif tensor.dtype == torch.float8_e4m3fn:
            if name in scales:
                yield name, dequantize_fp8_block(tensor, scales.pop(name), block)
            else:
                weights[name] = tensor
        else:
            yield name, tensor
    if weights or scales:
        unpaired = sorted(weights) + sorted(f"{n}_scale_inv" for n in scales)
        raise ValueError(f"fp8 checkpoint tensors without their weight/weight_scale_inv partner: {unpaired[:5]}")
