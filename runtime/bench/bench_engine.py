"""Engine benchmark: our engine against HF transformers on the same random weights.

For each model shape: batch-1 decode (tok/s, achieved GB/s, % of roofline = weight bytes over
measured device-to-device copy bandwidth), then N concurrent requests of 512 tokens in / 256 out
(output tok/s, TTFT and TPOT p50/p99), and the peers HF `generate` and HF `generate_batch`
(continuous batching) on the same weights in the same process. HF `generate` runs twice per load
(`--peer-repeats`): its first call at a new load size is the slow one (on the H200 847 against
2,600 tok/s at 64 concurrent, 12.7 against 38.5 at batch 1), so both are kept, and we are
measured against each: `x_hf_generate` against its fastest (warm) run, `x_hf_generate_first_run`
against its first.

    python runtime/bench/bench_engine.py --out results.json            # on the GPU machine
    python runtime/bench/bench_engine.py --shapes tiny --device cpu    # a quick check of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferd.config import EngineConfig  # noqa: E402
from inferd.engine.llm_engine import LLMEngine  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402

SHAPES = {
    # DeepSeek-R1-Distill-Llama-8B
    "llama-8b": dict(
        arch="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    # DeepSeek-R1-Distill-Qwen-1.5B
    "qwen-1.5b": dict(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    ),
    "tiny": dict(
        arch="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    ),
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_info(args) -> dict:
    """The header of a bench's results: when, on what (device, torch, transformers where it is
    installed) and with which arguments."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "args": vars(args),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def free_device_memory(device: str) -> None:
    """What a finished phase left (cycles of modules, the caching allocator's blocks) goes back to
    the card before the next phase sizes its KV cache from the free memory."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t)


def build_hf_model(shape: dict, device: str, dtype: torch.dtype, model_dir: Path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = {k: v for k, v in shape.items() if k != "arch"}
    kw.update(bos_token_id=1, eos_token_id=2)
    cfg = (LlamaConfig if shape["arch"] == "llama" else Qwen2Config)(**kw)
    cls = LlamaForCausalLM if shape["arch"] == "llama" else Qwen2ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg).to(dtype).eval()
    cfg.architectures = [cls.__name__]
    cfg.save_pretrained(model_dir)  # our engine reads config.json; weights are handed over in memory
    return model


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def hf_generate(model, prompts, new_tokens, device):
    x = torch.tensor(prompts, device=device)
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync(device)
    took = time.perf_counter() - t
    generated = (out.shape[1] - x.shape[1]) * x.shape[0]
    return {"output_tok_s": generated / took, "seconds": took, "tokens": generated}


def best_of(repeats: int, run, *args) -> dict:
    """The fastest of `repeats` runs, with every run's tok/s kept (the first is the cold one)."""
    runs = [run(*args) for _ in range(max(1, repeats))]
    best = max(runs, key=lambda r: r["output_tok_s"])
    return {**best, "runs_tok_s": [r["output_tok_s"] for r in runs]}


def hf_generate_batch(model, prompts, new_tokens, device):
    from transformers import GenerationConfig

    gc_ = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    sync(device)
    t = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=gc_)
    sync(device)
    took = time.perf_counter() - t
    generated = sum(len(o.generated_tokens) for o in outs.values())
    return {"output_tok_s": generated / took, "seconds": took, "tokens": generated}


def run_ours(engine: LLMEngine, prompts, new_tokens):
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first, done, counts = {}, {}, {}
    full_steps = []  # wall time of steps in which every request produced a token (steady decode)
    for p in prompts:
        engine.add_request(p, sp)
    last = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        t = time.perf_counter()
        if len(outs) == len(prompts) and all(not o.finished for o in outs):
            full_steps.append((t - last) * 1000)
        last = t
        for out in outs:
            now = t
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
                counts[out.request_id] = len(out.token_ids)
    took = time.perf_counter() - start
    ttft = [(first[r] - start) * 1000 for r in first]
    tpot = [(done[r] - first[r]) * 1000 / max(1, counts[r] - 1) for r in done]
    return {
        "output_tok_s": sum(counts.values()) / took,
        "seconds": took,
        "tokens": sum(counts.values()),
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p99": percentile(ttft, 99),
        "tpot_ms_p50": percentile(tpot, 50),
        "tpot_ms_p99": percentile(tpot, 99),
        "steady_step_ms_p50": percentile(full_steps, 50) if full_steps else None,
    }


def variant_key(variant: str) -> str:
    """Result key of an engine variant: "none" -> ours, "fp8" -> ours_fp8, "fp8/fp8" -> ours_fp8_kvfp8,
    "plain" -> ours_plain."""
    quant, _, kv = variant.partition("/")
    key = "ours" if quant == "none" else f"ours_{quant}"
    return key + (f"_kv{kv}" if kv else "")


def build_engine(variant: str, state: dict, **config) -> LLMEngine:
    """Our engine on `state`'s weights; variant "weights[/KV cache]": "fp8/fp8" is fp8 weights
    and an fp8 KV cache; "plain" is bf16 without the batch-1 GEMV kernels (cuBLAS, as before them)."""
    quant, _, kv = variant.partition("/")
    if quant == "plain":
        config = {**config, "fused_gemv": False}
    quant = None if quant in ("none", "plain") else quant
    config = EngineConfig(quantization=quant, kv_cache_dtype=kv or "auto", **config)
    return LLMEngine(config, weights=iter(state.items()))


def replay_ms(graph, reps: int = 50) -> float:
    """GPU time of one decode step alone (no scheduling, no sampling)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graph_us(fn, calls: int = 32, reps: int = 20) -> float:
    """Mean GPU microseconds of one fn() call: `calls` calls captured in a CUDA graph, replayed
    `reps` times, as the engine runs its kernels (timing plain calls would measure the host's
    launch overhead at small sizes)."""
    fn()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return replay_ms(graph, reps) * 1000 / calls


def profile(engine, prompts, steps) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_ours(engine, prompts, steps)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)


def bench_shape(name: str, args, bandwidth: float) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    shape = SHAPES[name]
    vocab = shape["vocab_size"]
    g = torch.Generator().manual_seed(1)
    rand_prompt = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    res: dict = {"shape": name}
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf_model(shape, device, dtype, Path(tmp))
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        res["weight_bytes"] = weight_bytes
        res["roofline_ms_per_token"] = weight_bytes / bandwidth * 1000
        b1_prompt = [rand_prompt(128)]
        loads = {n: [rand_prompt(args.prompt_len) for _ in range(n)] for n in args.concurrency}
        if not args.skip_peers:
            res["hf_generate_b1"] = best_of(args.peer_repeats, hf_generate, hf, b1_prompt, args.b1_tokens, device)
            for n, prompts in loads.items():
                res[f"hf_generate_{n}"] = best_of(args.peer_repeats, hf_generate, hf, prompts, args.output_len, device)
                try:
                    res[f"hf_generate_batch_{n}"] = hf_generate_batch(hf, prompts, args.output_len, device)
                except Exception as e:  # a peer failing is a result to report, not a reason to stop
                    res[f"hf_generate_batch_{n}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                free_device_memory(device)
        print(json.dumps({k: v for k, v in res.items() if k.startswith("hf_")}), flush=True)  # kept if the run is cut
        state = {k: v.to("cpu") for k, v in hf.state_dict().items()}
        del hf
        free_device_memory(device)
        for variant in args.quantization:
            key = variant_key(variant)
            t = time.perf_counter()
            engine = build_engine(
                variant,
                state,
                model=tmp,
                device=device,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                enforce_eager=args.eager,
                max_num_seqs=max(args.concurrency),
            )
            res[f"{key}_init_s"] = time.perf_counter() - t
            res[f"{key}_weight_bytes"] = engine.runner.weight_bytes()
            res[f"{key}_kv_blocks"] = engine.runner.num_blocks
            res[f"{key}_cuda_graphs"] = sorted(engine.runner.graphs)
            run_ours(engine, b1_prompt, 8)  # warm-up
            b1 = run_ours(engine, b1_prompt, args.b1_tokens)
            step_ms = b1["tpot_ms_p50"]
            # Against the bf16 roofline (the peers' weights) and against our own weight bytes.
            b1["pct_of_bf16_roofline"] = 100 * res["roofline_ms_per_token"] / step_ms
            own_roofline = res[f"{key}_weight_bytes"] / bandwidth * 1000
            b1["own_roofline_ms"] = own_roofline
            b1["achieved_GB_s"] = res[f"{key}_weight_bytes"] / (step_ms / 1000) / 1e9
            b1["pct_of_own_roofline"] = 100 * own_roofline / step_ms
            res[f"{key}_b1"] = b1
            if engine.runner.graphs:
                res[f"{key}_graph_replay_ms"] = {
                    bs: replay_ms(engine.runner.graphs[bs]) for bs in (1, 64) if bs in engine.runner.graphs
                }
            if args.profile:  # decode steps at the smallest concurrent load
                n = min(loads)
                res[f"{key}_profile_{n}"] = profile(engine, loads[n], 16)
            for n, prompts in loads.items():
                ours = res[f"{key}_{n}"] = run_ours(engine, prompts, args.output_len)
                peer = res.get(f"hf_generate_{n}", {})
                if peer.get("output_tok_s"):
                    ours["x_hf_generate"] = ours["output_tok_s"] / peer["output_tok_s"]
                    ours["x_hf_generate_first_run"] = ours["output_tok_s"] / peer["runs_tok_s"][0]
            print(json.dumps({k: v for k, v in res.items() if k.startswith(key)}), flush=True)
            engine.close()
            del engine
            free_device_memory(device)
        del state
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["qwen-1.5b", "llama-8b"], choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--b1-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--peer-repeats", type=int, default=2, help="run HF `generate` this many times per load; the fastest counts")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument(
        "--quantization",
        nargs="+",
        choices=["none", "plain", "fp8", "none/fp8", "fp8/fp8"],
        default=["none"],
        help="our engine's weights[/KV cache], one run each (peers stay bf16); fp8/fp8: fp8 weights and KV cache",
    )
    ap.add_argument("--profile", action="store_true", help="profile 16 steps of the smallest concurrent load")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = run_info(args)
    bw = copy_bandwidth(args.device)
    info["copy_bandwidth_GB_s"] = bw / 1e9
    print(json.dumps(info), flush=True)
    results = []
    for name in args.shapes:
        r = bench_shape(name, args, bw)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
