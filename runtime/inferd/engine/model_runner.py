"""Runs the model for one scheduled step: builds the flat token batch and the attention context,
owns the KV cache (on CUDA sized from memory measured after a warm-up, on the CPU a fixed size)
and, on CUDA, replays a CUDA graph captured for the nearest decode batch-size bucket."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from inferd.config import EngineConfig
from inferd.engine.compile_cache import open_compile_cache
from inferd.engine.sequence import Sequence
from inferd.layers.attention import PAGED_PREFILL_BYTES, ContextGroup, group_contexts
from inferd.layers.context import AttentionContext, reset_context, set_context
from inferd.layers.distributed import broadcast_from_rank0, min_over_ranks, tp_rank
from inferd.layers.fused import FP8
from inferd.layers.gemv_fusion import GEMV_DTYPES, fuse_gemv
from inferd.layers.quant import check_supported
from inferd.layers.quantize import fp8_blocks_as_built, keeps_fp8_blocks, quantize_fp8_blocks, quantize_model
from inferd.layers.sampler import Sampled, Sampler
from inferd.loader import load_weights
from inferd.models.config import ModelConfig
from inferd.models.registry import model_class

log = logging.getLogger("inferd.runner")

# Prompt positions scored (prompt logprobs) per logits slice.
PROMPT_SCORE_ROWS = 256


@dataclass
class StepHandle:
    """One launched step: which rows produce a token, and where their tokens will be: `device_tokens`
    on the device (the next step's pending inputs are gathered from it) and, on CUDA, pinned host
    memory the tokens reach behind the step's kernels."""

    complete: list[int]
    device_tokens: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    event: torch.cuda.Event | None = None
    # Rows that asked for top logprobs: ids and logprobs, [rows, k] (on the host behind the step).
    top: tuple[torch.Tensor, torch.Tensor] | None = None
    # Prompt logprobs of this prefill chunk: (batch row, position of the first scored token, scores).
    prompt: list[tuple[int, int, Sampled]] = field(default_factory=list)


def release_cuda_graphs(runner, wait: bool = True) -> None:
    """Destroy a runner's CUDA graphs. NCCL tears a communicator down (destroy and abort alike)
    only once every CUDA graph that captured one of its collectives is gone: it waits for them,
    forever if they outlive the call. So every rank drops its graphs before leaving the group.
    `wait=False` when a peer died: a step waiting for it would never end (a launched graph that
    is destroyed is freed when it ends, which the abort brings about)."""
    sets = [g for g in (getattr(runner, "graphs", None), getattr(runner, "verify_graphs", None)) if g]
    if not sets:
        return
    if wait:
        torch.cuda.synchronize(runner.device)
    for graphs in sets:
        for graph in graphs.values():
            graph.reset()
        graphs.clear()
    getattr(runner, "graph_outputs", {}).clear()
    getattr(runner, "verify_outputs", {}).clear()


def _even(rows: int) -> int:
    return rows + (rows & 1)


def _decode_input_offsets(rows: int, width: int) -> tuple[int, int, int]:
    """Byte offsets of decode_input_views' context lengths, block tables and end: each part
    starts on a 16-byte boundary, as a tensor of its own would (Triton specializes its kernels on
    pointers so aligned, and vectorizes their loads)."""
    up = lambda n: -(-n // 16) * 16  # noqa: E731
    lens = up(5 * _even(rows) * 8)
    tables = up(lens + rows * 4)
    return lens, tables, up(tables + rows * width * 4)


def decode_input_views(buf: torch.Tensor, rows: int, width: int) -> dict[str, torch.Tensor]:
    """A decode step's inputs for `rows` rows as views of one byte buffer, one after another so
    that one copy moves them all: five int64 rows (token id, position, cache slot, then the
    pending tokens' destination rows and source rows), the context lengths (int32) and the block
    tables (int32, rows x width), each int64 row and each part on a 16-byte boundary. The layout
    depends on the row count only: the host's pinned staging and the device's buffer (a CUDA
    graph's inputs) are laid out alike."""
    lens, tables, _ = _decode_input_offsets(rows, width)
    ints = buf[: 5 * _even(rows) * 8].view(torch.int64).view(5, _even(rows))[:, :rows]
    return {
        "ints": ints,
        "input_ids": ints[0],
        "positions": ints[1],
        "slot_mapping": ints[2],
        "pending": ints[3:5],
        "context_lens": buf[lens : lens + rows * 4].view(torch.int32),
        "block_tables": buf[tables : tables + rows * width * 4].view(torch.int32).view(rows, width),
    }


def decode_input_bytes(rows: int, width: int) -> int:
    """The size of decode_input_views' layout for `rows` rows of `width` block-table entries."""
    return _decode_input_offsets(rows, width)[2]


class ModelRunner:
    fused_gemv = False  # the batch-1 GEMV pass is installed (_fuse_for_batch_one)

    def __init__(
        self,
        config: EngineConfig,
        model_cfg: ModelConfig,
        max_model_len: int,
        weights,
        weight_bytes=None,
        *,
        verifies: bool = True,
    ):
        """`verifies`: this runner runs speculative decoding's verify passes (the target's; a
        draft model's runner does not)."""
        self.config = config
        self.model_cfg = model_cfg
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.kv_dtype = FP8 if config.kv_cache_dtype == "fp8" else self.dtype
        self.is_cuda = self.device.type == "cuda"
        torch.manual_seed(config.seed)
        check_supported(config.quantization, self.device)
        self.compile_cache = open_compile_cache(config, model_cfg, tp_rank())  # before anything compiles

        self._load_model(weights, weight_bytes)
        self.attn_layers = self.model.attention_layers()
        # The Triton kernel needs a power-of-two head_dim of at least 16 (tl.dot); real checkpoints
        # have 64 or 128. Tiny test models below that take the reference path.
        hd = model_cfg.head_dim
        self.use_triton = self.is_cuda and hd >= 16 and hd & (hd - 1) == 0
        for layer in self.attn_layers:
            layer.use_triton = self.use_triton
        self.sampler = Sampler(self.device, config.max_num_seqs)
        self.max_blocks_per_seq = (max_model_len + self.block_size - 1) // self.block_size
        # Host staging, two sets used in turn: while one step's copies may still be in flight, the
        # next step fills the other set. Decode inputs (rows: token id, position, slot, pending
        # destination, pending source; context lengths; block tables) and the sampled tokens.
        n, pin = config.max_num_seqs, self.is_cuda
        if config.speculative is not None:  # a verify pass runs k + 1 decode rows per sequence
            n *= 1 + config.speculative.num_speculative_tokens
        self.max_decode_rows = n
        # A verify pass of one sequence computes its rows as one (AttentionContext.rows_as_one) where
        # the batch-1 GEMV pass is installed: the rows then equal plain batch-1 steps bit for bit.
        # On CUDA with graphs, one graph per row count, captured without padding rows.
        self.verify_rows: list[int] = []
        if verifies and config.speculative is not None and self.fused_gemv:
            self.verify_rows = list(range(2, config.speculative.num_speculative_tokens + 2))
        self._staging = [
            {
                "inputs": torch.zeros(decode_input_bytes(n, self.max_blocks_per_seq), dtype=torch.uint8, pin_memory=pin),
                "tokens": torch.zeros(n, dtype=torch.long, pin_memory=pin),
                "logprobs": torch.zeros(n, dtype=torch.float32, pin_memory=pin),
            }
            for _ in range(2)
        ]
        self._turn = 0
        self.num_blocks = self._allocate_kv_cache()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.verify_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_outputs: dict[int, torch.Tensor] = {}
        self.verify_outputs: dict[int, torch.Tensor] = {}
        if self.is_cuda and not config.enforce_eager:
            self._capture_cuda_graphs()
        if self.compile_cache is not None:
            self.compile_cache.seal()  # the start-up's compiles are done: vouch for them

    def close(self) -> None:
        """Free the device memory this runner holds (graphs, KV cache, weights) even while
        something still references it: the next engine in this process, or another process on
        the card, sizes its KV cache from the free memory. The runner is unusable afterwards."""
        release_cuda_graphs(self)
        for name in ("model", "kv_cache", "attn_layers", "sampler", "_staging", "graph_inputs", "_graph_input_buf"):
            self.__dict__.pop(name, None)
        if self.is_cuda:
            gc.collect()  # modules refer to each other: the cycles hold the weights until collected
            torch.cuda.empty_cache()

    def _load_model(self, weights, weight_bytes) -> None:
        """The model in the configured dtype on the device, its weights loaded, then (with
        quantization) rewritten by the quantization pass: model files know nothing of it."""
        start = time.perf_counter()
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), fp8_blocks_as_built(self.model_cfg.weight_block_size, self.device):
                self.model = model_class(self.model_cfg)(self.model_cfg, self.max_model_len)
        finally:
            torch.set_default_dtype(default_dtype)
        load_weights(self.model, weights, total_bytes=weight_bytes)
        if self.config.quantization:
            quantize_model(self.model, self.config.quantization)
            if self.config.quantization == "fp8" and keeps_fp8_blocks(self.device):
                quantize_fp8_blocks(self.model, linears=False)  # stacked MoE experts: fp8 blocks
        elif getattr(self.model, "weight_block_size", None) and self.is_cuda:
            if torch.cuda.get_device_capability(self.device) >= (8, 9):  # fp8 tensor cores: Ada, Hopper
                quantize_fp8_blocks(self.model)  # an fp8 block checkpoint computes as fp8 blocks
        self._fuse_for_batch_one()
        self.model.eval()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        gb = self.weight_bytes() / 1e9
        log.info(
            "model %s loaded: %.2f GB of weights in %.1fs (%.2f GB/s)", self.config.model, gb, seconds, gb / max(seconds, 1e-9)
        )

    def _fuse_for_batch_one(self) -> None:
        """The batch-1 GEMV pass on the loaded (and quantized) model, where it applies; sets the
        process's programmatic-dependent-launch flag either way."""
        # Llama and Qwen2 (the distills), whose GPU tests ran with it; DeepSeek-V2/V3 keep the plain
        # kernels until test_cuda_deepseek.py has run with the pass.
        self.fused_gemv = fused = (
            self.is_cuda
            and self.config.fused_gemv
            and not self.config.quantization
            and self.dtype in GEMV_DTYPES
            and self.model_cfg.mla is None
            and not getattr(self.model, "weight_block_size", None)
        )
        if fused:
            fuse_gemv(self.model)
        if self.is_cuda:
            from inferd.layers.gemv import pdl_supported, set_pdl  # Triton: CUDA only

            # One flag per process: the runner built last decides (engines in one process are built
            # with one setting, except in the benchmarks' comparisons, which build one at a time).
            set_pdl(fused and pdl_supported(self.device))

    def weight_bytes(self) -> int:
        scales = [b for name, b in self.model.named_buffers() if name.endswith(("weight_scale", "w13_scale", "w2_scale"))]
        return sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *scales])

    # ---- KV cache -------------------------------------------------------------------------
    def kv_cache_layout(self) -> tuple[int, tuple[int, ...]]:
        """(cache tensors per layer, one token's entry shape), as the model's attention layers
        say: K and V of [kv heads, head_dim], or MLA's one latent of kv_lora_rank + rope dims."""
        layouts = {layer.kv_cache_layout(self.kv_dtype) for layer in self.attn_layers}
        if len(layouts) != 1:
            raise RuntimeError(f"attention layers with different cache layouts are not supported: {sorted(layouts)}")
        return layouts.pop()

    def kv_bytes_per_block(self) -> int:
        tensors, entry = self.kv_cache_layout()
        per_token = tensors * len(self.attn_layers) * int(np.prod(entry))
        return per_token * self.block_size * self.kv_dtype.itemsize

    @torch.inference_mode()
    def _warmup(self) -> None:
        """The largest prefill step the scheduler can produce, to measure activation memory (CUDA)."""
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(tokens, device=self.device)
        set_context(AttentionContext(is_prefill=True, query_lens=[tokens], context_lens_list=[tokens]))
        hidden = self.model(ids, pos)
        self.model.compute_logits(hidden[-min(tokens, self.config.max_num_seqs) :])
        reset_context()

    def _allocate_kv_cache(self) -> int:
        config = self.config
        per_block = self.kv_bytes_per_block()
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif self.is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._warmup()
            free, total = torch.cuda.mem_get_info(self.device)
            peak_extra = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
            budget = total * config.kv_cache_fraction - (total - free) - peak_extra
            num_blocks = int(budget // per_block)
        else:
            # No warm-up on the CPU: the cache has a fixed size, so it would measure nothing, and
            # its prefill of max_num_batched_tokens tokens was nearly all of the start-up (a model
            # of SmolLM2-135M's shape, float32, two cores: LLM() 25 s with it, 0.4 s without; the
            # first request took 0.35 s either way).
            num_blocks = config.cpu_kv_cache_bytes // per_block
        num_blocks = min_over_ranks(num_blocks)  # one block table serves every rank
        if num_blocks * self.block_size < self.max_model_len:
            raise RuntimeError(
                f"the KV cache holds {max(num_blocks, 0) * self.block_size} tokens, fewer than max_model_len "
                f"({self.max_model_len}): raise kv_cache_fraction (or cpu_kv_cache_bytes), or lower max_model_len"
            )
        # One extra block at the end: padded rows of a captured decode batch write there.
        tensors, entry = self.kv_cache_layout()
        shape = (tensors, len(self.attn_layers), num_blocks + 1, self.block_size, *entry)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.bind_kv_cache(*self.kv_cache[:, i])
        log.info(
            "KV cache: %d blocks of %d tokens, %s (%.2f GiB)",
            num_blocks,
            self.block_size,
            str(self.kv_dtype).removeprefix("torch."),
            num_blocks * per_block / 2**30,
        )
        return num_blocks

    # ---- inputs ---------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        table = np.asarray(seq.block_table, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _block_tables(self, seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        width = width or max(len(s.block_table) for s in seqs)
        table = np.full((len(seqs), width), self.num_blocks, dtype=np.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.block_table)] = s.block_table
        return torch.from_numpy(table).to(self.device, non_blocking=True)

    def _to_device(self, array, dtype=torch.long) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=dtype).to(self.device, non_blocking=True)

    def prepare_prefill(self, seqs: list[Sequence]):
        ids, positions, slots, query_lens, context_lens = [], [], [], [], []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            ids.extend(seq.token_ids[start:end])
            positions.append(np.arange(start, end))
            slots.append(self._slots(seq, start, end))
            query_lens.append(end - start)
            context_lens.append(end)
        has_cached = any(q != c for q, c in zip(query_lens, context_lens))
        ctx = AttentionContext(
            is_prefill=True,
            slot_mapping=self._to_device(np.concatenate(slots)),
            query_lens=query_lens,
            context_lens_list=context_lens,
            block_tables=self._block_tables(seqs) if has_cached else None,
        )
        q_offsets = np.concatenate([[0], np.cumsum(query_lens)])
        if self.is_cuda:
            ctx.cu_seqlens = self._to_device(q_offsets, torch.int32)
            ctx.max_query_len = max(query_lens)
            if has_cached and self.use_triton and self.dtype in (torch.bfloat16, torch.float16) and self.model_cfg.mla is None:
                ctx.context_groups = self._context_groups(seqs, query_lens, context_lens, q_offsets)
        return self._to_device(ids), self._to_device(np.concatenate(positions)), ctx, self._to_device(q_offsets[1:] - 1)

    def _context_groups(
        self, seqs: list[Sequence], query_lens: list[int], context_lens: list[int], q_offsets
    ) -> list[ContextGroup]:
        """The whole contexts (cached prefix + this chunk) of a prefill over cached contexts, in
        groups whose gathered K and V of one layer fit PAGED_PREFILL_BYTES."""
        per_token = 2 * self.attn_layers[0].num_kv_heads * self.model_cfg.head_dim * self.dtype.itemsize
        groups = []
        for first, last in group_contexts(context_lens, PAGED_PREFILL_BYTES // per_token):
            q, c = query_lens[first:last], context_lens[first:last]
            slots = np.concatenate([self._slots(s, 0, n) for s, n in zip(seqs[first:last], c)])
            groups.append(
                ContextGroup(
                    int(q_offsets[first]),
                    int(q_offsets[last]),
                    self._to_device(slots),
                    self._to_device(np.concatenate([[0], np.cumsum(q)]), torch.int32),
                    self._to_device(np.concatenate([[0], np.cumsum(c)]), torch.int32),
                    max(q),
                    max(c),
                )
            )
        return groups

    def _decode_inputs(self, seqs: list[Sequence], rows: int, staging: dict) -> int:
        """Fill the staging buffer with `rows` decode rows (decode_input_views' layout): the
        sequences, then padding rows that write into the scratch block and attend to one token
        there. Returns how many sequences have a pending token (listed in the pending rows)."""
        views = decode_input_views(staging["inputs"], rows, self.max_blocks_per_seq)
        ints, lens, tables = (views[k].numpy() for k in ("ints", "context_lens", "block_tables"))
        bsz = self.block_size
        tables[:rows] = self.num_blocks
        pending = 0
        for i, s in enumerate(seqs):
            n = len(s.token_ids)
            table = s.block_table
            ints[0, i] = s.token_ids[-1] if s.pending_row is None else 0
            ints[1, i] = n - 1
            ints[2, i] = table[(n - 1) // bsz] * bsz + (n - 1) % bsz
            lens[i] = n
            tables[i, : len(table)] = table
            if s.pending_row is not None:
                ints[3, pending], ints[4, pending] = i, s.pending_row
                pending += 1
        bs = len(seqs)
        ints[0:2, bs:rows] = 0
        ints[2, bs:rows] = self.num_blocks * bsz
        lens[bs:rows] = 1
        return pending

    @staticmethod
    def _fill_pending(ids: torch.Tensor, pending: torch.Tensor, prev: StepHandle | None) -> None:
        """Input ids still on the device: taken from the previous step's sampled tokens."""
        if pending.shape[1]:
            if prev is None or prev.device_tokens is None:
                raise RuntimeError("a sequence's last token is pending but no step is in flight")
            ids.index_copy_(0, pending[0], prev.device_tokens.index_select(0, pending[1]))

    # ---- running --------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool, prev: StepHandle | None = None) -> StepHandle:
        """Queue one step on the device and return without waiting for it. Input tokens that are
        still pending are read on the device from `prev` (the step in flight); the sampled tokens
        travel to pinned host memory behind the step's kernels, and `collect` waits for them."""
        staging = self._staging[self._turn]
        self._turn ^= 1
        if is_prefill:
            if any(s.has_pending_token for s in seqs):
                raise RuntimeError("a prefill chunk cannot contain a pending token")
            ids, positions, ctx, last = self.prepare_prefill(seqs)
            set_context(ctx)
            hidden = self.model(ids, positions)
            logits = self.model.compute_logits(hidden[last])
            prompt = self._score_prompt(seqs, hidden) if any(s.params.prompt_logprobs for s in seqs) else []
        else:
            logits, prompt = self._decode(seqs, staging, prev), []
        reset_context()
        complete = [i for i, s in enumerate(seqs) if s.num_computed_tokens + s.num_scheduled_tokens == len(s)]
        handle = StepHandle(complete, prompt=prompt)
        if complete and tp_rank() > 0:
            # Rank 0 samples; the others take its tokens, their next step's pending inputs.
            tokens = torch.empty(len(complete), dtype=torch.long, device=self.device)
            handle.device_tokens = handle.tokens = broadcast_from_rank0(tokens)
        elif complete:
            rows = logits if len(complete) == len(seqs) else logits[self._to_device(complete)]
            sampled = self.sampler.sample(rows, [seqs[i] for i in complete])
            tokens, logprobs = broadcast_from_rank0(sampled.tokens.long().contiguous()), sampled.logprobs
            handle.device_tokens = handle.tokens = tokens
            handle.logprobs = logprobs
            if sampled.top_ids is not None:
                handle.top = (sampled.top_ids, sampled.top_logprobs)
            if self.is_cuda:
                n = len(complete)
                handle.tokens = staging["tokens"][:n].copy_(tokens, non_blocking=True)
                if logprobs is not None:
                    handle.logprobs = staging["logprobs"][:n].copy_(logprobs, non_blocking=True)
                if handle.top is not None:  # to pinned memory, behind the step (only rows that asked)
                    handle.top = tuple(t.to("cpu", non_blocking=True) for t in handle.top)
                handle.event = torch.cuda.Event()
                handle.event.record()
        if self.is_cuda and handle.prompt and handle.event is None:  # a chunk scored, nothing sampled
            handle.event = torch.cuda.Event()
            handle.event.record()
        return handle

    @torch.inference_mode()
    def step_logits(self, seqs: list, is_prefill: bool, all_positions: bool = False, as_one: bool = False) -> torch.Tensor:
        """One step's logits, unsampled (speculative decoding samples and verifies them itself):
        a decode step replays its captured graph and gives a row per sequence; a prefill step (a
        chunk after cached context: a verify pass) gives each sequence's last position, or with
        `all_positions` every scheduled one. A decode step waits for the device: nothing else
        tells when its staging set may be refilled. `as_one`: decode rows computed as batch-1
        steps (`verify_rows`; the caller checks they are supported)."""
        if is_prefill:
            ids, positions, ctx, last = self.prepare_prefill(seqs)
            set_context(ctx)
            hidden = self.model(ids, positions)
            out = self.model.compute_logits(hidden if all_positions else hidden[last])
        else:
            staging = self._staging[self._turn]
            self._turn ^= 1
            out = self._decode(seqs, staging, None, as_one).clone()  # a graph's output is overwritten by its next replay
            if self.is_cuda:
                torch.cuda.current_stream(self.device).synchronize()
        reset_context()
        return out

    def _score_prompt(self, seqs: list[Sequence], hidden: torch.Tensor) -> list[tuple[int, int, Sampled]]:
        """Prompt logprobs for this chunk's positions of the sequences that ask: position p
        scores prompt token p + 1 (the last prompt position predicts the output instead)."""
        scores, offset = [], 0
        for i, s in enumerate(seqs):
            start, n = s.num_computed_tokens, s.num_scheduled_tokens
            end = min(start + n, s.num_prompt_tokens - 1)
            # In slices: a whole chunk's float32 logits (8,192 x 129,280) would be 4 GiB the
            # warm-up never measured.
            for a in range(start, end if s.params.prompt_logprobs else start, PROMPT_SCORE_ROWS):
                b = min(a + PROMPT_SCORE_ROWS, end)
                logits = self.model.compute_logits(hidden[offset + a - start : offset + b - start])
                sc = self.sampler.prompt_logprobs(logits, self._to_device(s.token_ids[a + 1 : b + 1]), s.params.top_logprobs)
                if self.is_cuda:
                    sc = Sampled(*(t.to("cpu", non_blocking=True) if t is not None else None for t in vars(sc).values()))
                scores.append((i, a + 1, sc))
            offset += n
        return scores

    @staticmethod
    def collect_scores(handle: StepHandle) -> tuple[list[list[tuple[int, float]]] | None, list]:
        """After `collect`: the rows' top logprobs ((id, logprob) lists, or None when no row asked)
        and the prompt scores as (batch row, first position, [(logprob, top list)])."""
        top = None
        if handle.top is not None:
            top = [list(zip(ids, lps)) for ids, lps in zip(handle.top[0].tolist(), handle.top[1].tolist())]
        prompt = []
        for row, first, sc in handle.prompt:
            alts = (
                [[]] * len(sc.tokens)
                if sc.top_ids is None
                else [list(zip(ids, lps)) for ids, lps in zip(sc.top_ids.tolist(), sc.top_logprobs.tolist())]
            )
            prompt.append((row, first, list(zip(sc.logprobs.tolist(), alts))))
        return top, prompt

    def collect(self, handle: StepHandle) -> tuple[list[int], list[float] | None]:
        """Wait for a launched step's tokens: one per row in `handle.complete`."""
        if handle.event is not None:
            handle.event.synchronize()
        if not handle.complete:
            return [], None
        logprobs = handle.logprobs.tolist() if handle.logprobs is not None else None
        return handle.tokens.tolist(), logprobs

    def _decode(self, seqs: list[Sequence], staging: dict, prev: StepHandle | None, as_one: bool = False) -> torch.Tensor:
        bs = len(seqs)
        as_one = as_one and bs > 1  # one row is a batch-1 step
        if as_one:  # graphs of exactly bs rows: a padding row would only cost
            graphs, outputs = self.verify_graphs, self.verify_outputs
            bucket = bs if bs in graphs else None
        else:
            graphs, outputs = self.graphs, self.graph_outputs
            bucket = next((b for b in sorted(graphs) if b >= bs), None)
        rows = bucket or bs
        pending = self._decode_inputs(seqs, rows, staging)
        # One asynchronous copy from the pinned staging buffer: the inputs' whole layout for
        # `rows` rows (six copies took ~17 us of the 1.5B's batch-1 step on the H200).
        size = decode_input_bytes(rows, self.max_blocks_per_seq)
        if bucket is None:
            width = max(len(s.block_table) for s in seqs)
            g = decode_input_views(staging["inputs"][:size].to(self.device, non_blocking=True), rows, self.max_blocks_per_seq)
            ids = g["input_ids"].clone()
            self._fill_pending(ids, g["pending"][:, :pending], prev)
            set_context(
                AttentionContext(
                    is_prefill=False,
                    slot_mapping=g["slot_mapping"],
                    context_lens=g["context_lens"],
                    block_tables=g["block_tables"][:, :width],
                    rows_as_one=as_one,
                )
            )
            return self.model.compute_logits(self.model(ids, g["positions"]))
        g = self.graph_inputs[bucket]
        self._graph_input_buf[:size].copy_(staging["inputs"][:size], non_blocking=True)
        if pending:
            self._fill_pending(g["input_ids"], g["pending"][:, :pending], prev)
        graphs[bucket].replay()
        return outputs[bucket][:bs]

    def graph_buckets(self) -> list[int]:
        top = min(self.config.max_num_seqs, self.config.cuda_graph_max_batch)
        buckets = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 16))
        return sorted(set(buckets + [top]))

    @torch.inference_mode()
    def _capture_cuda_graphs(self) -> None:
        start = time.perf_counter()
        buckets = self.graph_buckets()
        top = max(buckets + self.verify_rows)
        width = self.max_blocks_per_seq
        # Every graph's inputs are views of this one buffer, laid out for its row count (the
        # start of the buffer, whatever the count): a step copies its inputs in once.
        self._graph_input_buf = torch.zeros(decode_input_bytes(top, width), dtype=torch.uint8, device=self.device)
        self.graph_inputs = {}
        pool = None
        for bs, as_one in [(b, False) for b in reversed(buckets)] + [(r, True) for r in reversed(self.verify_rows)]:
            g = self.graph_inputs[bs] = decode_input_views(self._graph_input_buf, bs, width)
            # The warm-up's inputs: every row a padding row, as a step fills them.
            self._decode_inputs([], bs, self._staging[0])
            size = decode_input_bytes(bs, width)
            self._graph_input_buf[:size].copy_(self._staging[0]["inputs"][:size])
            ctx = AttentionContext(
                is_prefill=False,
                slot_mapping=g["slot_mapping"],
                context_lens=g["context_lens"],
                block_tables=g["block_tables"],
                rows_as_one=as_one,
            )
            set_context(ctx)
            # Warm up outside the graph (Triton autotuning/compilation, cuBLAS handles).
            self.model.compute_logits(self.model(g["input_ids"], g["positions"]))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.compute_logits(self.model(g["input_ids"], g["positions"]))
            if pool is None:
                pool = graph.pool()  # the smaller graphs reuse the largest one's memory
            (self.verify_graphs if as_one else self.graphs)[bs] = graph
            (self.verify_outputs if as_one else self.graph_outputs)[bs] = out
            torch.cuda.synchronize()
        reset_context()
        log.info(
            "captured %d CUDA graphs (%d for verify passes) in %.1fs",
            len(buckets) + len(self.verify_rows),
            len(self.verify_rows),
            time.perf_counter() - start,
        )
