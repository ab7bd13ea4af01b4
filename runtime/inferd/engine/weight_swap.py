"""Swapping a serving engine's weights in place, for hosts where two copies of the model do not
fit (issue 19): a restart costs the 8B shape 43-46 s of compiling and graph capture, so the new
weights go into the parameters the running process already has.

The steps, and what a failure at each leaves:
1. `stage`: the new model is read, verified (the store checks chunk and file digests as it reads)
   and loaded into a twin of the model in host memory (pinned on CUDA), quantized as the serving
   one is; its config, tokenizer and every tensor's name, shape and dtype must equal the serving
   model's. `snapshot` keeps the serving weights in host memory too. Both happen while the old
   weights serve; a failure here changes nothing.
2. The drain (AsyncLLMEngine): new requests wait in the queue, sequences already running go on
   for up to `drain_timeout`; those still running then go back to the head of the queue (their KV
   came from the old weights) and are recomputed with the new ones: their streams continue, with
   one pause, and nothing is aborted.
3. `apply`: the staged tensors are copied into the existing parameters (`copy_`: the storages the
   CUDA graphs and compiled code read stay the same). If a copy fails part way, the snapshot is
   copied back, so the old weights serve; if that fails too the engine thread dies and the owner
   restarts the process (a model of mixed weights must not serve).
4. The prefix cache forgets every block (old-weight KV must not be reused), and the engine
   resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inferd.layers.quantize import quantize_model
from inferd.loader import load_weights
from inferd.models.config import parse_model_config
from inferd.models.registry import model_class
from inferd.store.source import open_model

log = logging.getLogger("inferd.swap")

# Fields of ModelConfig that may differ between two models one set of parameters serves.
_FREE_FIELDS = {"eos_token_ids", "torch_dtype"}


class WeightSwapError(ValueError):
    """The swap was refused or undone; the message names why and the fix. The old weights serve."""


class SwapInProgress(WeightSwapError):
    """Another swap is staging or running."""


class WeightSwapRolledBack(WeightSwapError):
    """Copying the new weights failed part way; the previous ones were copied back and serve."""


@dataclass
class StagedWeights:
    path: str
    tensors: dict[str, torch.Tensor]
    nbytes: int
    seconds: float


@dataclass
class SwapReport:
    """What one swap did; times in seconds. `paused_s`: from the moment no new work was started
    (the drain began) to the resume; `token_gap_s`: from the last token any sequence got before
    the swap to the first one after (None when no sequence was in flight)."""

    old_model: str
    new_model: str
    staged_bytes: int
    staging_s: float
    drain_s: float = 0.0
    copy_s: float = 0.0
    paused_s: float = 0.0
    token_gap_s: float | None = None
    preempted: int = 0


@dataclass
class SwapJob:
    """A staged swap handed to the engine thread; `done` is set when it is over (or failed)."""

    staged: StagedWeights
    backup: dict[str, torch.Tensor]
    drain_timeout: float
    report: SwapReport
    drain_started: float | None = None
    resumed_at: float | None = None
    last_token_before: float | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint determines: the parameters and, with fp8, the scales (a linear's
    `weight_scale`, fp8 block experts' `w13_scale` / `w2_scale`)."""
    out = dict(model.named_parameters())
    out.update({n: b for n, b in model.named_buffers() if n.endswith("_scale")})
    return out


def _check_config(engine, source, path: str) -> None:
    text = source.read_text("config.json")
    if text is None:
        raise WeightSwapError(f"{path} has no config.json: give a model package or model directory")
    new = dataclasses.asdict(parse_model_config(json.loads(text)))
    old = dataclasses.asdict(engine.model_config)
    differ = [f"{k} ({old[k]!r} -> {new[k]!r})" for k in old if k not in _FREE_FIELDS and old[k] != new[k]]
    if differ:
        raise WeightSwapError(
            f"{path} is not the serving model's architecture and shape: {', '.join(differ[:4])}. An in-place swap "
            "only changes weights: serve it with a blue-green upgrade (release_strategy: blue_green) or a restart"
        )
    try:
        old_tok = open_model(engine.config.model, engine.config.model_key_file).read_text("tokenizer.json")
    except (OSError, ValueError):
        return  # the serving model's files are gone: its tokenizer cannot be compared, the shapes were
    if old_tok != source.read_text("tokenizer.json"):
        raise WeightSwapError(
            f"{path} has another tokenizer than the serving model: an in-place swap keeps the tokenizer, "
            "so serve it with a blue-green upgrade (release_strategy: blue_green) or a restart"
        )


def _build_twin(engine, source) -> torch.nn.Module:
    """The serving model's twin in host memory, loaded from `source` and quantized the same way."""
    runner = engine.runner
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(runner.dtype)
    try:
        with torch.device("cpu"):
            twin = model_class(engine.model_config)(engine.model_config, engine.max_model_len)
    finally:
        torch.set_default_dtype(default_dtype)
    load_weights(twin, source.iter_tensors(), total_bytes=source.weight_bytes(), progress=False)
    # Without handoffs: they change module classes, not tensors, and planning them traces a
    # forward pass through the process-wide attention context the serving engine is using.
    quantize_model(twin, engine.config.quantization, handoffs=False)
    return twin


def _check_tensors(live: dict[str, torch.Tensor], new: dict[str, torch.Tensor], path: str) -> None:
    if live.keys() != new.keys():
        odd = sorted(live.keys() ^ new.keys())
        raise WeightSwapError(f"{path}: its tensors are not the serving model's (differ: {odd[:3]}): refusing the swap")
    for name, t in live.items():
        n = new[name]
        if n.shape != t.shape or n.dtype != t.dtype:
            raise WeightSwapError(
                f"{path}: tensor {name} is {tuple(n.shape)} {n.dtype}, the serving model's is {tuple(t.shape)} "
                f"{t.dtype}: an in-place swap needs the same shapes and dtypes"
            )


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach()
    return t.pin_memory() if pin else t.contiguous()


def stage(engine, path: str | Path, public_key: bytes | None = None) -> StagedWeights:
    """Load and verify the model at `path` into host memory for `apply`; WeightSwapError (or the
    store's error) when it cannot serve in place of the running one. Changes nothing serving."""
    start = time.perf_counter()
    path = str(path)
    if engine.config.tensor_parallel_size > 1:  # the copy would reach rank 0's shard only
        raise WeightSwapError(
            f"an in-place swap is not supported with tensor_parallel_size {engine.config.tensor_parallel_size}: "
            "upgrade blue-green or restart the service (release_in_place_method: restart)"
        )
    if not (Path(path) / "config.json").exists() and not (Path(path) / "manifest.json").exists():
        raise WeightSwapError(f"{path} is not a model directory (no config.json) or packed model (no manifest.json)")
    source = open_model(path, engine.config.model_key_file, public_key)
    _check_config(engine, source, path)
    twin = _build_twin(engine, source)
    new = model_weights(twin)
    _check_tensors(model_weights(engine.runner.model), new, path)
    pin = engine.runner.is_cuda
    tensors = {}
    for name in list(new):
        tensors[name] = _host(new.pop(name), pin)  # one at a time: host memory holds one extra tensor
    del twin
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return StagedWeights(path, tensors, nbytes, time.perf_counter() - start)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The serving weights, copied to host memory (pinned on CUDA): what a failed copy restores."""
    out = {}
    for name, t in model_weights(model).items():
        if t.is_cuda:
            out[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out[name].copy_(t, non_blocking=True)
        else:
            out[name] = t.detach().clone()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One tensor's copy; a function of its own so that a test can make it fail part way."""
    dst.copy_(src, non_blocking=True)


@torch.no_grad()
def _copy_all(live: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    for name, dst in live.items():
        copy_tensor(dst, tensors[name])
    if any(t.is_cuda for t in live.values()):
        torch.cuda.synchronize()


def apply(engine, staged: StagedWeights, backup: dict[str, torch.Tensor]) -> None:
    """Copy the staged weights into the serving parameters, with nothing in flight. A failure part
    way copies `backup` back and raises WeightSwapError: the old weights serve. A failure of that
    copy too propagates (the engine must stop: its weights are mixed)."""
    live = model_weights(engine.runner.model)
    try:
        _copy_all(live, staged.tensors)
    except Exception as e:
        log.error("copying the new weights failed (%s: %s): copying the previous weights back", type(e).__name__, e)
        _copy_all(live, backup)
        raise WeightSwapRolledBack(
            f"copying the weights of {staged.path} failed ({type(e).__name__}: {e}); the previous weights were restored and serve"
        ) from e
    engine.block_manager.forget_prefixes()
    engine.config = dataclasses.replace(engine.config, model=staged.path)
    engine.runner.config = engine.config
