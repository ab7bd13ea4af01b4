"""inferd: the project's inference runtime for DeepSeek models."""

__version__ = "0.1.0"
