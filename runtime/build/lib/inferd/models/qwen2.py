"""Qwen2 architecture: DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B. The Llama block with q/k/v
biases (the config parser makes attention_bias true for Qwen2)."""

from __future__ import annotations

from inferd.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
