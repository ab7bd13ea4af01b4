"""inferd: the project's inference runtime for DeepSeek models.

`LLM`, `SamplingParams` and `RequestOutput` are imported on first use, so tools that need only the
model store or the key files (`inferd verify`, the model_decrypt module) do not load torch."""

__version__ = "0.1.0"

__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]

_LAZY = {"LLM": "inferd.llm", "RequestOutput": "inferd.outputs", "SamplingParams": "inferd.sampling_params"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'inferd' has no attribute {name!r}")
