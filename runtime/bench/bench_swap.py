"""The in-place weight swap (issue 19) on the GPU, for the 8B Llama shape in bfloat16 with random
weights: a steady decode load of `--streams` clients, each sending request after request; a
second 8B model is packed into the store and swapped in while they stream. Reports the pause
as the clients saw it (the largest gap between two tokens of one client across the swap), the
engine's own account (drain start to resume, the copy, the first token after), and the staging
time (host-side, while the old weights serve: not part of the pause). Then, budget permitting,
the blue-green memory split (two engines on one GPU, each with half of it) and the same swap
with fp8 weights.

    python3 bench/bench_swap.py --out $OUT/swap.json     (from runtime/; scripts/device-swap.sh)

Writes the JSON after every phase, so a run cut short keeps what it measured."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import SHAPES  # noqa: E402

from inferd.config import EngineConfig  # noqa: E402
from inferd.engine.async_engine import AsyncLLMEngine  # noqa: E402
from inferd.engine.llm_engine import LLMEngine  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402

# A shape for a smoke run on the CPU (--shape tiny --device cpu): checks the script, measures nothing.
SHAPES = {
    **SHAPES,
    "tiny": dict(
        SHAPES["llama-8b"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
SEED_BUDGET_S = 3.0  # the seed's pause (issue 19): the in-place pause must stay under it
START = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - START


def write_config(model_dir: Path, shape: dict) -> dict:
    cfg = {k: v for k, v in shape.items() if k != "arch"}
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return cfg


DEVICE = "cuda"


def random_tensors(cfg: dict, seed: int, device: str | None = None):
    """The checkpoint's tensors (Hugging Face names), random, made on the device one at a time."""
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])

    def rand(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).mul_(0.02)

    yield "model.embed_tokens.weight", rand(v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield p + f"self_attn.{name}.weight", rand(*shape)
        for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            yield p + f"mlp.{name}.weight", rand(*shape)
        yield p + "input_layernorm.weight", torch.ones(h, device=device, dtype=torch.bfloat16)
        yield p + "post_attention_layernorm.weight", torch.ones(h, device=device, dtype=torch.bfloat16)
    yield "model.norm.weight", torch.ones(h, device=device, dtype=torch.bfloat16)
    yield "lm_head.weight", rand(v, h)


def save_model(model_dir: Path, cfg: dict, seed: int, shard_bytes: int = 4 << 30) -> None:
    from safetensors.torch import save_file

    shard, size, n = {}, 0, 0
    for name, t in random_tensors(cfg, seed):
        shard[name] = t.cpu()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            save_file(shard, str(model_dir / f"model-{n:05d}.safetensors"))
            shard, size, n = {}, 0, n + 1
    if shard:
        save_file(shard, str(model_dir / f"model-{n:05d}.safetensors"))


def engine_config(model_dir: Path, args, **kw) -> EngineConfig:
    return EngineConfig(model=str(model_dir), device=DEVICE, dtype="bfloat16", max_model_len=args.max_model_len, **kw)


def build_engine(model_dir: Path, cfg: dict, seed: int, args, **kw) -> LLMEngine:
    t = time.perf_counter()
    engine = LLMEngine(engine_config(model_dir, args, **kw), weights=random_tensors(cfg, seed))
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    print(f"[{elapsed():.0f}s] engine ready in {time.perf_counter() - t:.1f}s ({kw})", flush=True)
    return engine


async def client(aengine, rng, args, stamps: list, stop: asyncio.Event) -> None:
    """One client of the steady load: request after request, every token's arrival stamped."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    while not stop.is_set():
        prompt = [rng.randrange(3, min(32000, args.vocab)) for _ in range(args.prompt_len)]
        async for _ in aengine.generate(prompt, params):
            stamps.append(time.perf_counter())
            if stop.is_set():
                break


def gaps(stamps: list[float], start: float, end: float) -> list[float]:
    """Gaps between consecutive tokens of one client whose interval overlaps [start, end]."""
    return [b - a for a, b in zip(stamps, stamps[1:]) if b >= start and a <= end]


async def swap_under_load(aengine, new_path: str, args) -> dict:
    rng = random.Random(0)
    stop = asyncio.Event()
    stamps = [[] for _ in range(args.streams)]
    tasks = [asyncio.create_task(client(aengine, rng, args, s, stop)) for s in stamps]
    await asyncio.sleep(args.warm_s)
    marks = {"swap_called": time.perf_counter()}

    def staged(_):
        marks["staged"] = time.perf_counter()

    report = await asyncio.to_thread(aengine.swap_weights, new_path, args.drain_timeout, None, staged)
    marks["swap_returned"] = time.perf_counter()
    await asyncio.sleep(args.after_s)
    stop.set()
    await asyncio.gather(*tasks)
    steady = [g for s in stamps for g in gaps(s, 0, marks["swap_called"])]
    staging = [g for s in stamps for g in gaps(s, marks["swap_called"], marks["staged"])]
    across = [max(gaps(s, marks["staged"], marks["swap_returned"]) or [0.0]) for s in stamps]
    steady.sort()
    return {
        "engine_report": {k: getattr(report, k) for k in report.__dataclass_fields__},
        "client_max_gap_across_swap_s": max(across),
        "client_max_gap_per_stream_s": across,
        "steady_gap_median_s": steady[len(steady) // 2] if steady else None,
        "steady_gap_p99_s": steady[int(len(steady) * 0.99)] if steady else None,
        "max_gap_during_staging_s": max(staging, default=None),
        "tokens": sum(map(len, stamps)),
        "pause_under_seed_budget": max(across) < SEED_BUDGET_S,
        "seed_budget_s": SEED_BUDGET_S,
    }


def release(*engines) -> None:
    for e in engines:
        if isinstance(e, AsyncLLMEngine):
            e.shutdown()
    del engines
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def phase_swap(args, cfg, dir_a: Path, new_path: Path, **kw) -> dict:
    aengine = AsyncLLMEngine(build_engine(dir_a, cfg, 1, args, **kw))
    try:
        out = asyncio.run(swap_under_load(aengine, str(new_path), args))
        out["weights_gb"] = aengine.engine.runner.weight_bytes() / 1e9
        return out
    finally:
        release(aengine)


def serve_both(engines, args) -> list[int]:
    """Each engine serves a batch in turn: the attention context is per process, so two engines
    of one process do not step at the same time (two colours are two processes in production)."""
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    prompts = [[5 + i, 7, 9] for i in range(args.streams)]
    return [len(o.token_ids) for e in engines for o in e.generate(prompts, params)]


def phase_blue_green(args, cfg, dir_a: Path) -> dict:
    """Two engines on one GPU: kv_cache_fraction is of the whole device, counting what is already
    in use, so the first takes half (0.45) and the second the rest up to 0.9."""
    first = build_engine(dir_a, cfg, 1, args, kv_cache_fraction=0.45, enforce_eager=args.bg_eager)
    second = build_engine(dir_a, cfg, 2, args, kv_cache_fraction=0.9, enforce_eager=args.bg_eager)
    try:
        lengths = serve_both([first, second], args)
        free, total = torch.cuda.mem_get_info() if DEVICE == "cuda" else (0, 0)
        per = [e.runner for e in (first, second)]
        return {
            "kv_cache_fraction": [0.45, 0.9],
            "kv_blocks": [r.num_blocks for r in per],
            "kv_tokens": [r.num_blocks * r.block_size for r in per],
            "weights_gb": [r.weight_bytes() / 1e9 for r in per],
            "gpu_total_gb": total / 1e9,
            "gpu_free_gb_both_serving": free / 1e9,
            "both_served_tokens": lengths,
            "fits": all(n == 32 for n in lengths),
        }
    finally:
        release(first, second)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/bench-swap", help="where the second model and its package are written")
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--warm-s", type=float, default=3.0)
    ap.add_argument("--after-s", type=float, default=3.0)
    ap.add_argument("--drain-timeout", type=float, default=0.0, help="0: in-flight sequences are recomputed at once")
    ap.add_argument("--no-pack", action="store_true", help="swap from the plain directory, not a store package")
    ap.add_argument("--bg-eager", action="store_true", help="blue-green engines without CUDA graphs (faster start)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip phases that would not finish within it")
    ap.add_argument("--phases", default="swap,blue_green,fp8")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (with --shape tiny)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    results: dict = {"shape": args.shape, "args": vars(args), "device": name}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(results, indent=2, default=str))

    work = Path(args.work)
    shape = SHAPES[args.shape]
    args.vocab = shape["vocab_size"]
    cfg = write_config(work / "a", shape)
    write_config(work / "b", shape)
    t = time.perf_counter()
    save_model(work / "b", cfg, seed=2)
    results["write_b_s"] = time.perf_counter() - t
    new_path = work / "b"
    if not args.no_pack:
        from inferd.store.packed import pack

        t = time.perf_counter()
        pack(work / "b", work / "b-packed", compress=False, model_id="bench-b")
        results["pack_b_s"] = time.perf_counter() - t
        new_path = work / "b-packed"
    results["swapped_from"] = str(new_path)
    save()
    phases = args.phases.split(",")
    costs = {"swap": 120, "blue_green": 110, "fp8": 150}  # rough seconds each, from the 45 s engine start
    for phase in phases:
        if elapsed() + costs[phase] > args.budget_s:
            results[phase] = {"skipped": f"{elapsed():.0f}s used of the {args.budget_s:.0f}s budget"}
            save()
            continue
        print(f"[{elapsed():.0f}s] phase {phase}", flush=True)
        try:
            if phase == "swap":
                results[phase] = phase_swap(args, cfg, work / "a", new_path)
            elif phase == "fp8":
                results[phase] = phase_swap(args, cfg, work / "a", new_path, quantization="fp8")
            else:
                results[phase] = phase_blue_green(args, cfg, work / "a")
        except Exception as e:  # one phase failing keeps the others' results
            results[phase] = {"error": f"{type(e).__name__}: {e}"}
        save()
        print(json.dumps({phase: results[phase]}, default=str)[:2000], flush=True)
    results["total_s"] = elapsed()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
