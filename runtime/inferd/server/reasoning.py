"""Splitting an R1-style answer into its thinking (`reasoning_content`) and its answer (`content`),
the field names vLLM and SGLang use, so clients written for them work unchanged.

R1's chat template ends the generation prompt with `<think>\\n`, so the model's output starts
inside the thinking and carries only the closing `</think>`; some checkpoints repeat the opening
tag anyway, and a thinking cut short (max_tokens) never closes: then all of it is reasoning and
the answer is empty, as vLLM reports it. A model whose prompt does not open the thinking reasons
only if its output starts with `<think>`; any other output is passed through untouched.

The parser is fed the engine's text deltas, so one implementation serves streams and whole
responses; a delta that ends in part of a tag is held back until the next one decides it.
"""

from __future__ import annotations

from typing import Literal

THINK_START = "<think>"
THINK_END = "</think>"

ReasoningMode = Literal["auto", "deepseek_r1", "none"]


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether the rendered prompt already opened the thinking (R1's generation prompt)."""
    return prompt_text.rstrip().endswith(THINK_START)


def parser_for(mode: ReasoningMode, prompt_text: str) -> ReasoningParser | None:
    """The parser a request's choices use: `deepseek_r1` treats every output as R1's, `auto`
    decides from the prompt (and, failing that, from the output's first characters), `none`
    leaves the text alone."""
    if mode == "none":
        return None
    return ReasoningParser(inside=mode == "deepseek_r1" or prompt_opens_thinking(prompt_text))


def _held(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """One choice's text, split as it arrives. `feed` and `finish` return (reasoning, content)
    deltas; `reasoned` says whether the output turned out to be a reasoning one."""

    def __init__(self, inside: bool):
        # "detect": the output may still open with <think>; "opening": inside, a repeated <think>
        # is dropped; "inside": thinking; "after": just closed, the blank lines before the answer
        # are dropped; "content": the answer.
        self.state = "opening" if inside else "detect"
        self.reasoned = inside
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        while self.buffer:
            if self.state in ("detect", "opening"):
                head = self.buffer.lstrip()
                if head.startswith(THINK_START):
                    self.buffer, self.state, self.reasoned = head[len(THINK_START) :], "inside", True
                    continue
                if not final and THINK_START.startswith(head):
                    break  # all of it could still be the opening tag
                self.state = "inside" if self.state == "opening" else "content"
            elif self.state == "inside":
                end = self.buffer.find(THINK_END)
                if end >= 0:
                    reasoning += self.buffer[:end]
                    self.buffer, self.state = self.buffer[end + len(THINK_END) :], "after"
                    continue
                keep = 0 if final else _held(self.buffer, THINK_END)
                reasoning += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            elif self.state == "after":
                self.buffer = self.buffer.lstrip("\n")
                if self.buffer:
                    self.state = "content"
            else:
                content, self.buffer = content + self.buffer, ""
        return reasoning, content
