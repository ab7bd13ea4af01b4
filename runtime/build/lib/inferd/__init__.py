"""inferd: the project's inference runtime for DeepSeek models."""

__version__ = "0.1.0"

from inferd.llm import LLM  # noqa: E402
from inferd.outputs import RequestOutput  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]
