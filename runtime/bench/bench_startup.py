"""Start-up on one GPU (issue 25 part 7): seconds from process start to the first token, for the
8B shape's random weights saved to disk as a Hugging Face checkpoint, each run a fresh process:

- HF: `from_pretrained` to the GPU, then one generated token;
- ours, cold: an empty compile cache directory (as every start was before: the service's /tmp is
  private to each start, and Inductor's cache lived there; --baseline adds a start without
  compile_cache_dir, to show what the cache itself costs a cold start);
- ours, warm: a second process with the same directory (a restart, or an upgrade's new instance
  of the same shape and versions).

Each of ours also reports its phases from the engine's log (weights loaded, graph capture) and
the size of the cache directory. The checkpoint is written first (in a process of its own, so
the runs start with an empty GPU); every run then reads it from the page cache alike.

    python runtime/bench/bench_startup.py --out startup.json            # the H200 (about 3 min)
    python runtime/bench/bench_startup.py --shape tiny --device cpu     # a check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

MAKE = r"""
import sys, torch
sys.path[:0] = [sys.argv[3], sys.argv[4]]
from pathlib import Path
from bench_engine import SHAPES, build_hf_model
model = build_hf_model(SHAPES[sys.argv[1]], sys.argv[2], getattr(torch, sys.argv[5]), Path(sys.argv[6]))
model.save_pretrained(sys.argv[6])
"""

OURS = r"""
import time
t0 = time.time()
import json, logging, sys
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
from inferd.config import EngineConfig
from inferd.engine.llm_engine import LLMEngine
from inferd.sampling_params import SamplingParams
t_import = time.time()
kw = json.loads(sys.argv[3])
engine = LLMEngine(EngineConfig(model=sys.argv[2], **kw))
t_engine = time.time()
engine.add_request(list(range(3, 131)), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
while engine.has_unfinished_requests():
    engine.step()
t_first = time.time()
print(json.dumps({"t0": t0, "import_s": t_import - t0, "engine_s": t_engine - t_import,
                  "first_token_s": t_first - t_engine, "t_first": t_first}))
"""

HF = r"""
import time
t0 = time.time()
import json, sys, torch
from transformers import AutoModelForCausalLM
t_import = time.time()
dtype = getattr(torch, sys.argv[3])
try:  # straight to the GPU where this transformers can (device_map)
    model, how = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype, device_map=sys.argv[2]), "device_map"
except (ImportError, ValueError) as e:
    print(f"device_map: {e}", file=sys.stderr)
    model, how = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype).to(sys.argv[2]), "to(device)"
if sys.argv[2].startswith("cuda"):
    torch.cuda.synchronize()
t_loaded = time.time()
x = torch.arange(3, 131, device=sys.argv[2])[None]
with torch.inference_mode():
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, pad_token_id=0)
t_first = time.time()
print(json.dumps({"t0": t0, "import_s": t_import - t0, "from_pretrained_s": t_loaded - t_import, "loaded_by": how,
                  "first_token_s": t_first - t_loaded, "t_first": t_first}))
"""

PHASES = {
    "weights_loaded_s": re.compile(r"loaded: .* in ([\d.]+)s"),
    "graph_capture_s": re.compile(r"captured \d+ CUDA graphs in ([\d.]+)s"),
}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run(code: str, argv: list[str], env: dict, timeout: float) -> dict:
    spawned = time.time()
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        return {"error": r.stderr[-3000:]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_start_to_first_token_s"] = out.pop("t_first") - spawned
    out["interpreter_start_s"] = out.pop("t0") - spawned
    for name, pattern in PHASES.items():
        m = pattern.search(r.stderr)
        if m:
            out[name] = float(m.group(1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--warm-runs", type=int, default=1)
    ap.add_argument("--cuda-graph-max-batch", type=int, default=None, help="fewer graph buckets (default: the engine's)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="also a start without compile_cache_dir (as cold, without sealing)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint and the caches go (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cpu" and args.dtype == "bfloat16":
        args.dtype = "float32"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-startup-"))
    model_dir, cache, scratch = work / "model", work / "compile-cache", work / "scratch"
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}

    def save():
        print(json.dumps(res), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))

    try:
        env = dict(os.environ)
        # Every run starts without the caches of earlier runs on this machine (Inductor's in /tmp,
        # Triton's in ~/.triton) unless it is given the compile cache directory.
        for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            env[name] = str(scratch / name)
        t = time.time()
        root = str(HERE.parent)
        make = [sys.executable, "-c", MAKE, args.shape, args.device, root, str(HERE), args.dtype, str(model_dir)]
        subprocess.run(make, check=True, env=env)
        res["checkpoint_write_s"] = time.time() - t
        res["checkpoint_bytes"] = dir_bytes(model_dir)
        save()
        if not args.skip_hf:
            res["hf"] = run(HF, [str(model_dir), args.device, args.dtype], env, args.timeout)
            save()
        kw = dict(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
        if args.cuda_graph_max_batch:
            kw["cuda_graph_max_batch"] = args.cuda_graph_max_batch
        shutil.rmtree(scratch, ignore_errors=True)
        if args.baseline:
            res["ours_no_cache_dir"] = run(OURS, [root, str(model_dir), json.dumps(kw)], env, args.timeout)
            save()
        kw["compile_cache_dir"] = str(cache)
        for i in range(1 + args.warm_runs):
            shutil.rmtree(scratch, ignore_errors=True)
            r = run(OURS, [root, str(model_dir), json.dumps(kw)], env, args.timeout)
            r["cache_dir_bytes"] = dir_bytes(cache)
            res["ours_cold" if i == 0 else f"ours_warm{'' if i == 1 else i}"] = r
            save()
        cold, warm = res["ours_cold"], res.get("ours_warm", {})
        if "process_start_to_first_token_s" in cold and "process_start_to_first_token_s" in warm:
            res["warm_saves_s"] = cold["process_start_to_first_token_s"] - warm["process_start_to_first_token_s"]
        save()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
