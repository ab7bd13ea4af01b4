"""Start-up of the engine on CPU: seconds from `import inferd` to a built `LLM(...)`, and to the first
answer, each in a fresh process (the demo host's and the test suite's path).

    python runtime/bench/bench_cpu_startup.py [--model HF_DIR] [--repeats 3] [--out results.json]

Without --model it uses the demo's SmolLM2-135M-Instruct (scripts/demo-model.sh converts it once)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from inferd import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM(sys.argv[1], device="cpu", dtype="float32", max_model_len=512)
t2 = time.perf_counter()
prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "llm_s": t2 - t1, "first_answer_s": t3 - t2, "text": out.text}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    model = (
        args.model
        or subprocess.run([str(ROOT / "scripts/demo-model.sh")], check=True, capture_output=True, text=True).stdout.split()[-1]
    )
    runs = []
    for _ in range(args.repeats):
        r = subprocess.run([sys.executable, "-c", CHILD, model], check=True, capture_output=True, text=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    result = {"model": model, "runs": runs, "llm_s_min": min(r["llm_s"] for r in runs)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
