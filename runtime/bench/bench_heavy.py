"""Heavy loads on one GPU (issue 25 parts 3 and 6), random weights made on the GPU:

(a) N concurrent requests of 2,048 tokens in / 512 out (default 256);
(b) prefix-heavy: one shared 1,500-token system prompt, then N requests of it plus a question of
    about 100 tokens, 256 out each;
(c) the host KV tier: how many blocks it adds to the GPU's, and the time to first token of a
    1,500-token prefix copied back from host memory against computing it again (and against a
    GPU prefix-cache hit).

For (a) and (b): output and total tok/s, TTFT p50/p99, the prefix-cache hit rate, and where the
time goes against the card's bound for that load: the prefill FLOPs at the card's measured bf16
matmul rate plus, per decode step, the larger of its bytes (weights + every running sequence's
KV) at the measured copy bandwidth and its FLOPs at the matmul rate. Wall time is split into
prefill and decode steps by charging each `engine.step()` call to the step it waited for (the
engine runs one step ahead, so this is approximate by one step).

    python runtime/bench/bench_heavy.py --out heavy.json                     # the H200 (about 3 min)
    python runtime/bench/bench_heavy.py --shape tiny --device cpu --quick    # a check of the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_engine import SHAPES, copy_bandwidth, free_device_memory, percentile, sync  # noqa: E402
from bench_tp import write_config  # noqa: E402
from random_shards import RandomShardRunner  # noqa: E402

from inferd.config import EngineConfig  # noqa: E402
from inferd.engine.block_manager import chain_hash, tenant_salt  # noqa: E402
from inferd.engine.llm_engine import LLMEngine  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402


def matmul_flops(device: str) -> float:
    """Measured bf16 (fp32 on the CPU) matmul rate, FLOP/s."""
    n = 8192 if device.startswith("cuda") else 512
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


class LoadModel:
    """FLOPs and bytes of one load on one shape: what the card's bound is computed from."""

    def __init__(self, shape: dict, weight_bytes: int, kv_bytes_per_token: float):
        h, layers = shape["hidden_size"], shape["num_hidden_layers"]
        kv_dim = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
        per_layer = h * (h + 2 * kv_dim) + h * h + 3 * h * shape["intermediate_size"]
        self.body_flops_per_token = 2 * per_layer * layers
        self.head_flops = 2 * h * shape["vocab_size"]
        self.attn_flops_per_pair = 4 * h * layers  # QK^T and PV, per (query, key) pair
        self.weight_bytes = weight_bytes
        self.kv_bytes_per_token = kv_bytes_per_token

    def prefill_flops(self, cached: int, length: int) -> float:
        """Computing positions cached..length-1 of one prompt (logits for the last only)."""
        new = length - cached
        pairs = new * cached + new * (new + 1) / 2  # causal: position i attends to i + 1 keys
        return new * self.body_flops_per_token + pairs * self.attn_flops_per_pair + self.head_flops

    def bound_s(self, prompts: list[tuple[int, int]], output_len: int, peak_flops: float, bandwidth: float) -> dict:
        """prompts: (tokens taken from a cache, prompt length) for each request, all running
        together; decode steps batch every request."""
        prefill = sum(self.prefill_flops(c, n) for c, n in prompts) / peak_flops
        decode = 0.0
        for t in range(1, output_len):
            ctx = sum(n + t for _, n in prompts)
            step_bytes = self.weight_bytes + ctx * self.kv_bytes_per_token
            step_flops = len(prompts) * (self.body_flops_per_token + self.head_flops) + ctx * self.attn_flops_per_pair
            decode += max(step_bytes / bandwidth, step_flops / peak_flops)
        return {"prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode}


def run_load(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict:
    """All prompts at once; throughput, TTFT, prefix hits and wall time by step kind."""
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    sched, bm = engine.scheduler, engine.block_manager
    schedule = sched.schedule
    launched: list[str] = []

    def recording():
        batch, is_prefill = schedule()
        launched.append(("prefill" if is_prefill else "decode") if batch else "none")
        return batch, is_prefill

    sched.schedule = recording
    q0, h0 = bm.prefix_queries, bm.prefix_hits
    cached: dict[str, int] = {}
    first, counts = {}, {}
    wall = {"prefill": 0.0, "decode": 0.0, "none": 0.0}
    try:
        start = time.perf_counter()
        ids = [engine.add_request(p, sp).request_id for p in prompts]
        while engine.has_unfinished_requests():
            waited_for = launched[-1] if launched else "none"
            t = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            wall[waited_for] += now - t
            for out in outs:
                first.setdefault(out.request_id, now)
                if out.finished:
                    counts[out.request_id] = len(out.token_ids)
                    cached[out.request_id] = out.num_cached_tokens
        sync(engine.config.device)
        took = time.perf_counter() - start
    finally:
        sched.schedule = schedule
    ttft = [(first[r] - start) * 1000 for r in ids]
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": sum(counts.values()),
        "seconds": took,
        "output_tok_s": sum(counts.values()) / took,
        "total_tok_s": (sum(counts.values()) + prompt_tokens) / took,
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p99": percentile(ttft, 99),
        "prefix_hit_rate": (bm.prefix_hits - h0) / max(1, bm.prefix_queries - q0),
        "cached_tokens": [cached[r] for r in ids],
        "wall_s_by_step_kind": wall,
        "steps": {k: launched.count(k) for k in ("prefill", "decode")},
        "preemptions": sched.num_preemptions,
    }


def against_bound(res: dict, model: LoadModel, prompts, output_len, peak, bw) -> None:
    lengths = [(c, len(p)) for c, p in zip(res.pop("cached_tokens"), prompts)]
    bound = model.bound_s(lengths, output_len, peak, bw)
    res["bound_s"] = bound
    res["pct_of_bound"] = 100 * bound["total_s"] / res["seconds"]
    wall = res["wall_s_by_step_kind"]
    res["prefill_pct_of_bound"] = 100 * bound["prefill_s"] / max(wall["prefill"], 1e-9)
    res["decode_pct_of_bound"] = 100 * bound["decode_s"] / max(wall["decode"], 1e-9)


def ttft_ms(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """One request alone on an idle engine: ms to its first token, and its cached prompt tokens."""
    sync(engine.config.device)
    t = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    sync(engine.config.device)
    return (time.perf_counter() - t) * 1000, out.num_cached_tokens


def host_tier(args, tmp: str, rand, gpu_blocks_default: int | None) -> dict:
    """(c): a GPU cache of --host-gpu-blocks blocks (so that evicting a prefix takes seconds)
    and a host tier of --host-kv-cache-gb."""
    # One request at a time: a few graph buckets are enough (and capture quickly).
    small = dict(max_num_seqs=8, cuda_graph_max_batch=8)
    engine = build(args, tmp, num_kv_blocks=args.host_gpu_blocks, host_kv_cache_gb=args.host_kv_cache_gb, **small)
    bm, host = engine.block_manager, engine.block_manager.host_cache
    res = {
        "gpu_blocks": engine.runner.num_blocks,
        "host_blocks": host.num_slots,
        "block_bytes": host.block_bytes,
        "host_gb": host.num_slots * host.block_bytes / 1e9,
        "gpu_blocks_at_default_fraction": gpu_blocks_default,
    }
    if gpu_blocks_default:
        res["capacity_gained_x_default_gpu"] = host.num_slots / gpu_blocks_default
    ttft_ms(engine, rand(64))  # warm-up
    prefixes = [rand(args.prefix_len) for _ in range(args.host_samples)]
    recompute, gpu_hit, host_hit, cached = [], [], [], []
    for p in prefixes:
        recompute.append(ttft_ms(engine, p + rand(16))[0])
        gpu_hit.append(ttft_ms(engine, p + rand(16))[0])
    filler = args.prompt_len
    t = time.perf_counter()
    hits0, saved0 = host.hits, host.saved
    for _ in range(engine.runner.num_blocks * engine.config.block_size // filler + 2):
        ttft_ms(engine, rand(filler))
    res["evict_pass_s"] = time.perf_counter() - t
    res["blocks_saved_to_host"] = host.saved - saved0
    salt = tenant_salt("")
    first_blocks = [chain_hash(p[: engine.config.block_size], salt) for p in prefixes]
    res["prefixes_evicted_from_gpu"] = sum(h not in bm.hash_to_block for h in first_blocks)
    for p in prefixes:
        ms, c = ttft_ms(engine, p + rand(16))
        host_hit.append(ms)
        cached.append(c)
    res["host_blocks_restored"] = host.hits - hits0
    res["host_hit_cached_tokens"] = cached
    for name, values in (("recompute", recompute), ("gpu_hit", gpu_hit), ("host_hit", host_hit)):
        res[f"ttft_ms_{name}"] = values
        res[f"ttft_ms_{name}_p50"] = percentile(values, 50)
    res["host_hit_speedup_vs_recompute"] = res["ttft_ms_recompute_p50"] / res["ttft_ms_host_hit_p50"]
    del engine
    return res


def build(args, tmp: str, **kw) -> LLMEngine:
    settings = dict(max_num_seqs=args.concurrency, cuda_graph_max_batch=args.cuda_graph_max_batch) | kw
    config = EngineConfig(model=tmp, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, **settings)
    return LLMEngine(config, weights=iter(()), runner_cls=RandomShardRunner)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--prefix-len", type=int, default=1500)
    ap.add_argument("--question-len", type=int, default=100, help="mean; each question is 80-120 %% of it")
    ap.add_argument("--prefix-output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--cuda-graph-max-batch", type=int, default=256)
    ap.add_argument("--host-kv-cache-gb", type=float, default=16.0)
    ap.add_argument("--host-gpu-blocks", type=int, default=4096, help="(c)'s GPU cache, small so that eviction is quick")
    ap.add_argument("--host-samples", type=int, default=3)
    ap.add_argument("--loads", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of the script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.prompt_len, args.output_len, args.prefix_len = 8, 64, 8, 48
        args.question_len, args.prefix_output_len, args.max_model_len = 10, 8, 256
        args.host_kv_cache_gb, args.host_gpu_blocks, args.cuda_graph_max_batch = 0.01, 64, 8
    shape = SHAPES[args.shape]
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, shape["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    bw, peak = copy_bandwidth(args.device), matmul_flops(args.device)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "copy_bandwidth_GB_s": bw / 1e9,
        "matmul_TFLOP_s": peak / 1e12,
    }
    print(json.dumps(res), flush=True)

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))

    gpu_blocks = None
    with tempfile.TemporaryDirectory() as tmp:
        write_config(shape, Path(tmp))
        if {"a", "b"} & set(args.loads):
            t = time.perf_counter()
            engine = build(args, tmp)
            res["init_s"] = time.perf_counter() - t
            gpu_blocks = res["kv_blocks"] = engine.runner.num_blocks
            kv_per_token = engine.runner.kv_bytes_per_block() / engine.config.block_size
            model = LoadModel(shape, engine.runner.weight_bytes(), kv_per_token)
            ttft_ms(engine, rand(64))  # warm-up
            if "a" in args.loads:
                prompts = [rand(args.prompt_len) for _ in range(args.concurrency)]
                r = res["a_concurrent"] = run_load(engine, prompts, args.output_len)
                against_bound(r, model, prompts, args.output_len, peak, bw)
                print(json.dumps({"a_concurrent": r}), flush=True)
                save()
            if "b" in args.loads:
                system = rand(args.prefix_len)
                q = args.question_len
                lens = torch.randint(int(q * 0.8), int(q * 1.2) + 1, (args.concurrency,), generator=g).tolist()
                prompts = [system + rand(n) for n in lens]
                r = res["b_prefix_heavy"] = run_load(engine, prompts, args.prefix_output_len)
                against_bound(r, model, prompts, args.prefix_output_len, peak, bw)
                # The ideal: the system prompt computed once, every question after it.
                ideal = [(0, len(prompts[0]))] + [(args.prefix_len // 16 * 16, len(p)) for p in prompts[1:]]
                r["bound_s_ideal_sharing"] = model.bound_s(ideal, args.prefix_output_len, peak, bw)
                print(json.dumps({"b_prefix_heavy": r}), flush=True)
                save()
            del engine
            free_device_memory(args.device)
        if "c" in args.loads:
            r = res["c_host_tier"] = host_tier(args, tmp, rand, gpu_blocks)
            print(json.dumps({"c_host_tier": r}), flush=True)
            free_device_memory(args.device)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
