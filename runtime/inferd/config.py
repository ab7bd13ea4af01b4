"""Engine settings: one dataclass the offline API, the server (embedded in its ServerConfig) and the
benchmarks share: one set of defaults, checked once when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# Weight/activation formats beyond the compute dtype (tests/modules/test_gpu_assess.py holds
# gpu_assess to this list).
Quantization = Literal["fp8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
# The KV cache's element type: "auto" is the model's dtype; "fp8" (e4m3, unit scale, values
# clamped to +-448) halves what decode attention reads per token.
KVCacheDType = Literal["auto", "fp8"]
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KVCacheDType)


@dataclass
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on CUDA
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # Sequences that may wait for a place in the batch; a request beyond it is refused (429).
    max_num_waiting: int = 1024
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at 8192
    block_size: int = 16
    kv_cache_fraction: float = 0.9  # of the device memory free after the warm-up run
    cpu_kv_cache_bytes: int = 1 << 30  # KV cache size on CPU, where "free memory" means little
    num_kv_blocks: int | None = None  # fixed size, overriding the two above (tests force preemption with it)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_max_batch: int = 128
    seed: int = 0
    quantization: str | None = None  # "fp8": fp8 weights (per channel) and activations (per token)
    kv_cache_dtype: str = "auto"  # or "fp8"
    model_key_file: str | None = None  # for encrypted packed models (else $INFERD_MODEL_KEY_FILE / credential)
    # GPUs (one process each) the model is split over by attention heads and MLP columns; on the
    # CPU, processes (the tests). It must divide the model's attention and KV heads.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype is None:
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)} or none, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization and self.device != "cpu" and self.dtype != "bfloat16":
            raise ValueError(f"fp8 on CUDA computes in bfloat16: set dtype bfloat16 (got {self.dtype})")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int):
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError("kv_cache_fraction must be in (0, 1]")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.max_num_waiting < 1:
            raise ValueError("max_num_waiting must be >= 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_seqs must be >= 1 and max_num_batched_tokens >= block_size")
