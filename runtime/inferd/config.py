"""Engine settings: one dataclass the offline API, the server (embedded in its ServerConfig) and the
benchmarks share: one set of defaults, checked once when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# Weight/activation formats beyond the compute dtype (tests/modules/test_gpu_assess.py holds
# gpu_assess to this list).
# int8: W8A8 (int8 tensor cores); int8_weight_only: W8A16, for batch 1 (layers/int8.py).
Quantization = Literal["fp8", "int8", "int8_weight_only"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
# The KV cache's element type: "auto" is the model's dtype; "fp8" (e4m3, unit scale, values
# clamped to +-448) halves what decode attention reads per token.
KVCacheDType = Literal["auto", "fp8"]
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KVCacheDType)


SpeculativeMethod = Literal["ngram", "draft_model"]
SPECULATIVE_METHODS: tuple[str, ...] = get_args(SpeculativeMethod)


@dataclass
class SpeculativeConfig:
    """Speculative decoding (engine/speculative.py): `num_speculative_tokens` drafted per step and
    verified in one target pass, by prompt lookup ("ngram": the sequence's own prompt and output,
    matching its last `ngram_max` down to `ngram_min` tokens) or by a smaller model sharing the
    target's tokenizer ("draft_model": a model directory). `adaptive`: speculation pauses while it
    measures slower than plain decoding (engine/speculative.py, `SpecGate`)."""

    method: str
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    draft_model: str | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative.method must be one of {list(SPECULATIVE_METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise ValueError(f"speculative.num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        lo, hi = self.ngram_min, self.ngram_max
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(f"speculative needs integers 1 <= ngram_min <= ngram_max, got {lo!r} and {hi!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative.adaptive must be true or false, got {self.adaptive!r}")
        if (self.method == "draft_model") != (self.draft_model is not None):
            raise ValueError("speculative.draft_model (a model directory) goes with method draft_model, and only with it")


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
    # Batch-1 decode through the fused GEMV kernels (layers/gemv.py: norm in the prologue, SiLU in
    # the epilogue, programmatic dependent launch on Hopper) for unquantized models on CUDA;
    # False: cuBLAS and the separate norm / SiLU kernels (the benchmarks compare both).
    fused_gemv: bool = True
    cuda_graph_max_batch: int = 128
    seed: int = 0
    quantization: str | None = None  # fp8 or int8: weights (per channel) and activations (per token); int8_weight_only
    kv_cache_dtype: str = "auto"  # or "fp8"
    model_key_file: str | None = None  # for encrypted packed models (else $INFERD_MODEL_KEY_FILE / credential)
    # GPUs (one process each) the model is split over by attention heads and MLP columns; on the
    # CPU, processes (the tests). It must divide the model's attention and KV heads.
    tensor_parallel_size: int = 1
    # Pinned host memory (GB) holding KV blocks the GPU prefix cache evicts, copied back on a hit
    # (engine/host_cache.py); 0: off, as pinning takes host memory the operator must budget.
    host_kv_cache_gb: float = 0.0
    # Where torch.compile's and Triton's compiled artifacts persist across restarts (None: torch's
    # per-user temporary directory); see engine/compile_cache.py.
    compile_cache_dir: str | None = None
    # Speculative decoding (a SpeculativeConfig, or its fields as a dict); None: plain decoding.
    speculative: SpeculativeConfig | dict | None = None

    def __post_init__(self) -> None:
        self._check_speculative()
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
            raise ValueError(f"{self.quantization} on CUDA computes in bfloat16: set dtype bfloat16 (got {self.dtype})")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int):
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if isinstance(self.host_kv_cache_gb, bool) or not isinstance(self.host_kv_cache_gb, int | float):
            raise ValueError(f"host_kv_cache_gb must be a number of GB >= 0, got {self.host_kv_cache_gb!r}")
        if self.host_kv_cache_gb < 0:
            raise ValueError(f"host_kv_cache_gb must be >= 0 (0 turns the host KV cache off), got {self.host_kv_cache_gb}")
        if self.host_kv_cache_gb and not self.enable_prefix_caching:
            raise ValueError("host_kv_cache_gb extends the prefix cache: set enable_prefix_caching true or host_kv_cache_gb 0")
        if self.host_kv_cache_gb and self.tensor_parallel_size > 1:
            raise ValueError(
                "host_kv_cache_gb is not supported with tensor_parallel_size > 1 yet (each rank holds a shard of "
                "every block): set host_kv_cache_gb 0"
            )
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError("kv_cache_fraction must be in (0, 1]")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.max_num_waiting < 1:
            raise ValueError("max_num_waiting must be >= 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_seqs must be >= 1 and max_num_batched_tokens >= block_size")

    def _check_speculative(self) -> None:
        if isinstance(self.speculative, dict):
            fields = set(SpeculativeConfig.__dataclass_fields__)
            unknown = sorted(set(self.speculative) - fields)
            if unknown:
                raise ValueError(f"speculative: unknown setting(s) {unknown}; known: {sorted(fields)}")
            if "method" not in self.speculative:
                raise ValueError(f"speculative needs a method: one of {list(SPECULATIVE_METHODS)}")
            self.speculative = SpeculativeConfig(**self.speculative)
        if self.speculative is not None and self.tensor_parallel_size != 1:
            raise ValueError("speculative decoding runs on one GPU: set tensor_parallel_size 1 or leave speculative out")
