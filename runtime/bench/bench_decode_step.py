"""Where a decode (or prefill) step's time goes (CUDA).

1. `attention`: the paged decode kernel alone on a synthetic cache, swept over its launch
   configuration (tile, warps, pipeline stages, context splits) for bf16 and fp8 caches; reports
   microseconds and the KV bytes read per second against the measured copy bandwidth.
2. `step`: our engine with N requests in steady decode; the profiler's per-kernel GPU time per
   step (CUDA-graph replays included), with full kernel names.
3. `prefill`: the same for prefill steps of N fresh prompts (N x 512 tokens, one step when that
   fits max_num_batched_tokens), with the step's linear-layer TFLOP/s (2 x linear weights x tokens
   over the step's wall time).
4. `ablate`: the batch-1 step (bf16, GEMV kernels) recaptured with one part taken out or changed
   at a time (rotary, the KV store, attention, its context splits and tiles, programmatic
   dependent launch, the early loads, which kernels launch the next before they wait), and the
   engine's time per token for the whole step and the launch variants: graph replay against the
   whole step's, so the difference is that part's cost on the critical path (outputs are wrong
   where parts are taken out; only time is read). The
   replays run at each context of `--context` tokens (256 by default, the middle of the batch-1
   benchmark's 128-384; 1 is attention's floor), set in the graph's input buffers.
5. `timeline`: steady batch-1 decode under the profiler: what the device does between one step's
   graph replay and the next (input copies, sampling, the tokens' copy) and how long it idles.

    python runtime/bench/bench_decode_step.py attention --out attention.json
    python runtime/bench/bench_decode_step.py step --shape llama-8b --quantization none fp8 --out step.json
    python runtime/bench/bench_decode_step.py prefill --batch 16 --quantization none fp8 --out prefill.json
    python runtime/bench/bench_decode_step.py ablate --shape qwen-1.5b --out ablate.json
    python runtime/bench/bench_decode_step.py timeline --shape qwen-1.5b --out timeline.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import (  # noqa: E402
    SHAPES,
    build_engine,
    build_hf_model,
    copy_bandwidth,
    graph_us,
    percentile,
    replay_ms,
    run_info,
    run_ours,
    variant_key,
)

from inferd.sampling_params import SamplingParams  # noqa: E402


def time_us(fn, *args, **kwargs) -> float:
    """GPU microseconds of fn(*args, **kwargs): 20 calls in a CUDA graph, replayed 5 times."""
    return graph_us(functools.partial(fn, *args, **kwargs), calls=20, reps=5)


def attention(args, bandwidth: float) -> dict:
    from inferd.layers.paged_decode import paged_decode_attention

    heads, kv_heads = (int(n) for n in args.heads.split("x"))
    head_dim, block_size = 128, 16
    results = []
    for batch, ctx in args.loads:
        blocks_per_seq = -(-ctx // block_size)
        num_blocks = batch * blocks_per_seq + 1
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        tables = torch.randperm(num_blocks - 1, device="cuda", dtype=torch.int32)[: batch * blocks_per_seq].view(batch, -1)
        # Products in bf16 for either cache, and in fp16 for an fp8 cache, whose V is widened
        # either by Triton's cast or in registers before shared memory (the engine's launch).
        computes = {
            torch.bfloat16: [(torch.bfloat16, False)],
            torch.float8_e4m3fn: [(torch.bfloat16, False), (torch.float16, False), (torch.float16, True)],
        }
        for cache_dtype, compute_dtypes in computes.items():
            if str(cache_dtype).removeprefix("torch.") not in args.caches:
                continue
            kc = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda").to(cache_dtype)
            vc = torch.randn_like(kc, dtype=torch.float32).to(cache_dtype)
            call = (paged_decode_attention, q, kc, vc, tables, lens, head_dim**-0.5)
            kv_bytes = 2 * batch * ctx * kv_heads * head_dim * cache_dtype.itemsize
            roofline_us = kv_bytes / bandwidth * 1e6
            default = time_us(*call)  # the launch the engine makes for this cache
            for compute, widen_v in compute_dtypes:
                rows = []
                for tile, warps, stages, splits in itertools.product(args.tiles, args.warps, args.stages, args.splits):
                    config = {"tile": tile, "warps": warps, "stages": stages, "splits": splits}
                    try:
                        launch = dict(splits=splits, tile=tile, num_warps=warps, num_stages=stages)
                        us = time_us(*call, **launch, compute_dtype=compute, widen_v_in_registers=widen_v)
                    except Exception as e:  # e.g. out of shared memory: a result, not a stop
                        rows.append({**config, "error": str(e)[:120]})
                        continue
                    rows.append({**config, "us": us})
                timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
                entry = {
                    "batch": batch,
                    "context": ctx,
                    "cache": str(cache_dtype).removeprefix("torch."),
                    "compute": str(compute).removeprefix("torch."),
                    "v_widened_in_registers": widen_v,
                    "kv_MB": kv_bytes / 1e6,
                    "roofline_us": roofline_us,
                    "default_us": default,
                    "default_pct_bw": 100 * roofline_us / default,
                    "best": timed[0],
                    "best_pct_bw": 100 * roofline_us / timed[0]["us"],
                    "sweep": timed[:12],
                }
                print(json.dumps({k: v for k, v in entry.items() if k != "sweep"}), flush=True)
                results.append(entry)
            del kc, vc
            torch.cuda.empty_cache()
    return {"attention": results}


def variant_engines(args, **config):
    """(variant, engine) for each of --quantization, on one set of random weights in the shape's
    form; each engine is freed before the next is built."""
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf_model(shape, args.device, getattr(torch, args.dtype), Path(tmp))
        state = {k: v.to("cpu") for k, v in hf.state_dict().items()}
        del hf
        gc.collect()
        for variant in args.quantization:
            engine = build_engine(variant, state, model=tmp, device=args.device, dtype=args.dtype, max_model_len=4096, **config)
            yield variant, engine
            engine.close()  # its KV cache took most of the card: the next variant sizes its own
            del engine
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()


def timed_and_profiled(run, steps: int, sync):
    """Wall milliseconds per call of run() over `steps` calls, then the profiler over as many."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    t = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    wall_ms = (time.perf_counter() - t) * 1000 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        sync()
    return wall_ms, prof


def step_profile(args) -> dict:
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    out: dict = {}
    for variant, engine in variant_engines(args, max_num_seqs=args.batch):
        sp = SamplingParams(max_tokens=args.warm_steps + 2 * args.steps + 8, temperature=0.0, ignore_eos=True)
        for p in prompts:
            engine.add_request(p, sp)
        for _ in range(args.warm_steps):  # prefill, then steady decode
            engine.step()
        wall_ms, prof = timed_and_profiled(engine.step, args.steps, sync)
        key = variant_key(variant)
        out[key] = kernel_table(prof, args.steps, wall_ms)
        print(f"== {variant}: {wall_ms:.2f} ms/step wall, {out[key]['kernel_ms_per_step']:.2f} ms kernels", flush=True)
        print_kernels(out[key]["kernels"])
    return {"step": out}


def kernel_table(prof, steps: int, wall_ms: float) -> dict:
    """The profiler's GPU kernels, per step, slowest first."""
    kernels = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev_us <= 0 or evt.key.startswith(("aten::", "Torch-Compiled", "## Call", "cuda", "Memcpy", "Memset")):
            continue
        kernels.append(
            {
                "kernel": evt.key[:160],
                "calls_per_step": evt.count / steps,
                "us_per_call": dev_us / evt.count,
                "us_per_step": dev_us / steps,
            }
        )
    kernels.sort(key=lambda r: -r["us_per_step"])
    return {
        "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": sum(r["us_per_step"] for r in kernels) / 1000,
        "kernels": kernels[:40],
    }


def print_kernels(kernels: list[dict], rows: int = 30) -> None:
    for r in kernels[:rows]:
        print(f"{r['us_per_step']:9.1f} us/step {r['calls_per_step']:6.1f}x {r['us_per_call']:8.2f} us  {r['kernel']}")


def linear_weights(shape: dict) -> int:
    """Weights every prompt token goes through (not the embedding, not the lm_head)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    head_dim = h // shape["num_attention_heads"]
    qkv = h * (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    return shape["num_hidden_layers"] * (qkv + h * h + 3 * h * i)


def prefill_profile(args) -> dict:
    """Prefill steps of `batch` fresh prompts each, after one such round to compile and warm up."""
    shape = SHAPES[args.shape]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(1)
    tokens = args.batch * args.prompt_len
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    out: dict = {}
    engines = variant_engines(args, max_num_seqs=max(args.batch, 1), max_num_batched_tokens=max(tokens, 8192))
    for variant, engine in engines:

        def prefill_round(engine=engine) -> None:
            for _ in range(args.batch):
                engine.add_request(torch.randint(3, shape["vocab_size"], (args.prompt_len,), generator=g).tolist(), sp)
            while engine.has_unfinished_requests():
                engine.step()

        prefill_round()  # compile, warm up
        wall_ms, prof = timed_and_profiled(prefill_round, args.steps, sync)
        key = variant_key(variant)
        out[key] = kernel_table(prof, args.steps, wall_ms)
        out[key]["tokens"] = tokens
        out[key]["linear_TFLOP_s"] = 2 * linear_weights(shape) * tokens / (wall_ms / 1000) / 1e12
        print(
            f"== {variant}: {tokens} prompt tokens in {wall_ms:.1f} ms wall ({out[key]['linear_TFLOP_s']:.0f} TFLOP/s"
            f" in the linear layers), {out[key]['kernel_ms_per_step']:.1f} ms kernels",
            flush=True,
        )
        print_kernels(out[key]["kernels"])
    return {"prefill": out}


def _ablations():
    """name -> a context manager that changes one part of the step while the graphs are captured."""
    import contextlib

    from inferd.layers import gemv, paged_decode
    from inferd.layers.rotary import RotaryEmbedding

    @contextlib.contextmanager
    def patched(obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        try:
            yield
        finally:
            setattr(obj, name, old)

    @contextlib.contextmanager
    def attention_launch(tile: int, max_splits: int):
        launch = functools.partial(paged_decode.paged_decode_attention, tile=tile)
        with patched(paged_decode, "paged_decode_attention", launch), patched(paged_decode, "MAX_SPLITS", max_splits):
            yield

    def unrotated(self, positions, qkv, q_size, kv_size):
        return qkv.split([q_size, kv_size, kv_size], dim=-1)

    return {
        "whole step": contextlib.nullcontext,
        "loads after the wait (no early loads)": lambda: patched(gemv, "_PDL", {**gemv._PDL, "early": False}),
        "without rotary": lambda: patched(RotaryEmbedding, "forward", unrotated),
        "without the KV store": lambda: patched(paged_decode, "store_kv_triton", lambda *a, **k: None),
        "without attention": lambda: patched(paged_decode, "paged_decode_attention", lambda q, *a, **k: q),
        "attention in one split": lambda: patched(paged_decode, "num_splits", lambda *a, **k: 1),
        **{
            f"attention: {tile}-token tiles, at most {most} splits": functools.partial(attention_launch, tile, most)
            for tile in (32, 64)
            for most in (8, 16)
        },
        "no kernel launches the next before it waits": lambda: patched(gemv, "_PDL", {**gemv._PDL, "ahead": ()}),
        "the GEMVs launch the next before they wait too": lambda: patched(
            gemv, "_PDL", {**gemv._PDL, "ahead": (*gemv._PDL["ahead"], "gemv")}
        ),
        "without programmatic dependent launch": lambda: patched(gemv, "_PDL", {**gemv._PDL, "on": False}),
    }


def ablate(args, bandwidth: float) -> dict:
    from inferd.engine.model_runner import release_cuda_graphs

    shape = SHAPES[args.shape]
    g = torch.Generator().manual_seed(1)
    prompt = [torch.randint(3, shape["vocab_size"], (128,), generator=g).tolist()]
    args.quantization = ["none"]
    rows = []
    for _, engine in variant_engines(args, max_num_seqs=1):
        runner = engine.runner
        roofline_ms = runner.weight_bytes() / bandwidth * 1000
        run_ours(engine, prompt, 8)  # the KV cache holds a context of 128 + a few tokens
        variants = [(n, c) for n, c in _ablations().items() if n == "whole step" or any(v in n for v in args.variants)]
        if len(variants) == 1 and args.variants != [""]:
            print(f"--variants {args.variants}: no variant's name holds one of these; the whole step only", file=sys.stderr)
        for name, change in [*variants, variants[0]]:  # the whole step again last: the drift
            release_cuda_graphs(runner)
            with change():
                runner._capture_cuda_graphs()
            row = {"variant": name}
            g = runner.graph_inputs[1]
            for context in args.context:
                blocks = -(-context // runner.block_size)
                with torch.inference_mode():  # the graph's buffers are inference tensors
                    g["block_tables"][0, :blocks] = torch.arange(blocks, device=g["block_tables"].device)
                    g["context_lens"][0] = context
                    g["slot_mapping"][0] = context - 1  # its blocks are 0, 1, ...: the last token's slot
                replay = min(replay_ms(runner.graphs[1]) for _ in range(5))
                row[f"replay_ms_at_{context}"] = replay
            row["replay_pct_of_roofline"] = {c: 100 * roofline_ms / row[f"replay_ms_at_{c}"] for c in args.context}
            if name == "whole step" or any(t in name for t in args.tpot_of) or name.startswith("loads after") or "before" in name:
                b1 = run_ours(engine, prompt, 256)
                row.update(tpot_ms_p50=b1["tpot_ms_p50"], pct_of_roofline=100 * roofline_ms / b1["tpot_ms_p50"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"ablate": {"shape": args.shape, "roofline_ms": roofline_ms, "rows": rows}}


def timeline(args) -> dict:
    """Steady batch-1 decode (bf16) under the profiler: the device's work between one step's graph
    replay and the next (input copies, the pending token's gather, sampling, the tokens' copy to
    the host) and the idle time, against the replay's own span."""
    from torch.profiler import ProfilerActivity, profile

    shape = SHAPES[args.shape]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, shape["vocab_size"], (128,), generator=g).tolist()
    args.quantization = ["none"]
    for _, engine in variant_engines(args, max_num_seqs=1):
        run_ours(engine, [prompt], 8)
        engine.add_request(prompt, SamplingParams(max_tokens=args.steps + 40, temperature=0.0, ignore_eos=True))
        for _ in range(16):  # prefill and the first decode steps
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        while engine.has_unfinished_requests():
            engine.step()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            trace = json.loads(Path(f.name).read_text())["traceEvents"]
    launches = {e["args"].get("correlation") for e in trace if e.get("name") == "cudaGraphLaunch"}
    gpu = sorted(
        (e for e in trace if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    # Consecutive ops of one graph launch form a replay; the ops between replays are the step's rest.
    steps, current = [], None
    for e in gpu:
        corr = e["args"].get("correlation")
        in_graph = corr in launches
        if in_graph and (current is None or current["corr"] != corr):
            current = {"corr": corr, "start": e["ts"], "end": e["ts"] + e["dur"], "between": []}
            steps.append(current)
        elif in_graph:
            current["end"] = max(current["end"], e["ts"] + e["dur"])
        elif current is not None:
            current["between"].append(e)
    rows = []
    for a, b in zip(steps, steps[1:]):
        ops = [
            {"name": e["name"][:80], "us": e["dur"], "at_us": e["ts"] - a["end"]} for e in a["between"] if e["ts"] < b["start"]
        ]
        rows.append(
            {
                "replay_us": a["end"] - a["start"],
                "gap_us": b["start"] - a["end"],
                "busy_us": sum(o["us"] for o in ops),
                "ops": ops,
            }
        )
    summary = {
        "steps": len(rows),
        **{f"{k}_median": percentile([r[k] for r in rows], 50) for k in ("replay_us", "gap_us", "busy_us")},
        "a_gap": rows[len(rows) // 2] if rows else {},
    }
    print(json.dumps(summary, indent=1), flush=True)
    return {"timeline": {"shape": args.shape, **summary, "rows": rows}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["attention", "step", "prefill", "ablate", "timeline"])
    ap.add_argument("--loads", nargs="+", default=["64x640", "16x640", "1x4096", "64x2048"], help="BATCHxCONTEXT")
    ap.add_argument("--tiles", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--heads", default="32x8", help="attention: query heads x KV heads (32x8: the 8B; 12x2: the 1.5B)")
    ap.add_argument("--caches", nargs="+", default=["bfloat16", "float8_e4m3fn"], help="attention: the cache types swept")
    ap.add_argument("--device", default="cuda", help="cpu: a quick check of the step profile's code")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--quantization", nargs="+", default=["none", "fp8"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--context", type=int, nargs="+", default=[256], help="ablate: the contexts the replays run at")
    ap.add_argument(
        "--tpot-of",
        nargs="+",
        default=[],
        help="ablate: the variants whose name holds one of these also timed per output token over 256 tokens"
        " (the whole step and the early-loads and launch-ahead variants always are)",
    )
    ap.add_argument("--variants", nargs="+", default=[""], help="ablate: those whose name holds one of these")
    ap.add_argument("--warm-steps", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not all(1 <= c <= 4096 for c in args.context):
        ap.error(f"--context: from 1 to the benchmark engines' max_model_len (4096) tokens, got {args.context}")
    args.loads = [tuple(int(x) for x in load.split("x")) for load in args.loads]
    info = run_info(args)
    bw = copy_bandwidth(args.device)
    info["copy_bandwidth_GB_s"] = bw / 1e9
    print(json.dumps(info), flush=True)
    run = {
        "attention": lambda: attention(args, bw),
        "step": lambda: step_profile(args),
        "prefill": lambda: prefill_profile(args),
        "ablate": lambda: ablate(args, bw),
        "timeline": lambda: timeline(args),
    }
    res = run[args.what]()
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, **res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
