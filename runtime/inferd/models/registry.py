from __future__ import annotations

from torch import nn

from inferd.models.config import ModelConfig


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.architecture == "LlamaForCausalLM":
        from inferd.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if cfg.architecture == "Qwen2ForCausalLM":
        from inferd.models.qwen2 import Qwen2ForCausalLM

        return Qwen2ForCausalLM
    if cfg.architecture == "DeepseekV2ForCausalLM":
        from inferd.models.deepseek import DeepseekV2ForCausalLM

        return DeepseekV2ForCausalLM
    if cfg.architecture == "DeepseekV3ForCausalLM":
        from inferd.models.deepseek import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM
    raise ValueError(f"no model class for {cfg.architecture}")
