"""Tokenizer from a Hugging Face model directory: `tokenizers` for tokenizer.json, jinja2 for the
chat template in tokenizer_config.json (rendered the way transformers renders it)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, source):
        """`source`: a model directory, or a model source (inferd.store.source) for packed models."""
        if isinstance(source, (str, Path)):
            from inferd.store.source import PlainSource

            source = PlainSource(source)
        text = source.read_text("tokenizer.json")
        if text is None:
            raise FileNotFoundError("the model has no tokenizer.json")
        self._tok = HFTokenizer.from_str(text)
        cfg_text = source.read_text("tokenizer_config.json")
        self.config = json.loads(cfg_text) if cfg_text else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.chat_template = self.config.get("chat_template") or source.read_text("chat_template.jinja")
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._compiled = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer_config.json lacks chat_template)")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class IncrementalDetokenizer:
    """Text deltas for a growing list of tokens at constant cost per token: decode a short window
    twice (with and without the new tokens) and emit the difference, holding back incomplete
    UTF-8 sequences. The window keeps enough left context for tokenizers whose pieces only
    render correctly next to their neighbours."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def add_until(self, token_id: int, stops: list[str]) -> tuple[str, bool]:
        """`add`, then look for the stop strings in the text the new delta could have completed.
        On a hit the text ends before the stop string (and stays so: the request is over).
        Returns (delta, hit)."""
        delta = self.add(token_id)
        if not stops or not delta:
            return delta, False
        window = self.text[-(len(delta) + max(map(len, stops))) :]
        hits = [h for h in (window.find(s) for s in stops) if h >= 0]
        if not hits:
            return delta, False
        cut = len(self.text) - len(window) + min(hits)
        delta = delta[: max(0, cut - (len(self.text) - len(delta)))]
        self.text = self.text[:cut]
        return delta, True

    def flush(self) -> str:
        """The text held back (an incomplete UTF-8 sequence at the end), as the full decode
        renders it; for the end of a request."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        delta = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
