"""The offline Python API: LLM(path).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

from inferd.config import EngineConfig
from inferd.engine.llm_engine import LLMEngine
from inferd.outputs import RequestOutput
from inferd.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, device: str = "cpu", dtype: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.engine.generate(prompts, sampling_params or SamplingParams(), use_tqdm=use_tqdm)
