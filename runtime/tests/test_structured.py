"""Structured output: `response_format` json_object and json_schema, enforced while sampling by a
grammar (engine/structured.py). The tiny model's weights are random, so anything valid it writes
is the grammar's doing: that is the test. Through the official openai client, streaming and not."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pydantic
import pytest
import torch

from inferd.sampling_params import InvalidRequestError, SamplingParams


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = pydantic.Field(ge=0, le=30)
    vaccinated: bool
    name: str = pydantic.Field(max_length=6)


PET_SCHEMA = Pet.model_json_schema() | {"additionalProperties": False}


@pytest.mark.parametrize("seed", range(4))
def test_random_weights_write_a_valid_document_for_the_schema(engine, seed):
    out = engine.generate(["hello"], SamplingParams(max_tokens=80, temperature=1.0, seed=seed, json_schema=PET_SCHEMA))[0]
    assert out.finish_reason == "stop", out.text
    Pet.model_validate_json(out.text)


def test_without_a_schema_the_same_weights_write_no_json(engine):
    # The control: the grammar, not the model, makes the documents valid.
    out = engine.generate(["hello"], SamplingParams(max_tokens=40, temperature=1.0, seed=0, ignore_eos=True))[0]
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_rows_without_a_grammar_are_untouched_in_a_mixed_batch(engine):
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = engine.generate(["the quick brown fox"], free)[0].token_ids
    mixed = engine.generate(
        ["the quick brown fox", "hello", "jumps"],
        [free, SamplingParams(max_tokens=60, temperature=0.0, json_schema={"type": "object"}), free],
    )
    assert mixed[0].token_ids == alone
    assert isinstance(json.loads(mixed[1].text), dict) and mixed[1].finish_reason == "stop"


def test_the_document_ends_the_sequence_with_stop_before_max_tokens(engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    out = engine.generate(["x"], SamplingParams(max_tokens=100, temperature=1.0, seed=1, json_schema=schema))[0]
    assert out.finish_reason == "stop" and json.loads(out.text) in ({"ok": True}, {"ok": False})
    assert len(out.token_ids) < 100


def _allowed(grammar, vocab: int) -> torch.Tensor:
    row = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    grammar.fill_bitmask(row)
    return row


def _highest(row: torch.Tensor) -> int:
    bits = ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return int(bits.nonzero().max())


def test_a_batch_of_masks_filled_in_parallel_equals_each_filled_alone(engine):
    from inferd.engine.structured import Grammar

    vocab = engine._grammars.vocab_size
    grammars = [engine._grammars.matcher(PET_SCHEMA) for _ in range(3)] + [engine._grammars.matcher({"type": "object"})]
    for g, n in zip(grammars, (0, 2, 9, 1)):  # each at its own point of a document
        for _ in range(n):  # the highest token it allows: a walk that differs from the others
            g.accept(_highest(_allowed(g, vocab)))
    alone = torch.stack([_allowed(g, vocab) for g in grammars])
    assert len({tuple(r.tolist()) for r in alone}) == len(grammars)  # they differ: rows are not mixed up
    batch = torch.zeros(len(grammars) + 1, (vocab + 31) // 32, dtype=torch.int32)
    Grammar.fill_bitmasks(batch, [(g, i + 1) for i, g in enumerate(grammars)])  # row 0 left to others
    assert torch.equal(batch[1:], alone) and not batch[0].any()


def test_a_step_fills_all_its_constrained_rows_in_one_parallel_call(engine, monkeypatch):
    import llguidance.torch

    calls = []
    real = llguidance.torch.fill_next_token_bitmask_par

    def spy(executor, matchers, bitmask):
        calls.append(sorted(i for _, i in matchers))
        real(executor, matchers, bitmask)

    prompts = ["hello", "a pet", "the quick brown fox", "jumps"]
    params = [SamplingParams(max_tokens=100, temperature=0.0, json_schema=PET_SCHEMA) for _ in range(3)]
    params.insert(1, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    monkeypatch.setattr(llguidance.torch, "fill_next_token_bitmask_par", spy)
    together = engine.generate(prompts, params)
    assert [o.token_ids for o in together] == alone  # the same tokens as each request alone
    assert [0, 2, 3] in calls  # the free row (1) is not handed to the grammar
    for i in (0, 2, 3):
        Pet.model_validate_json(together[i].text)


@pytest.mark.parametrize(
    "schema", [{"type": "nope"}, {"type": "string", "pattern": "("}, {"$ref": "#/missing"}, {"minimum": "x", "type": "integer"}]
)
def test_a_schema_the_grammar_cannot_enforce_is_refused_naming_response_format(schema):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(json_schema=schema)
    assert e.value.param == "response_format" and "response_format" in str(e.value)


# ---- the API -------------------------------------------------------------------------------------
MSG = [{"role": "user", "content": "Describe a pet as JSON."}]


def _parse(client):
    # openai 3.x has the parse helper on chat.completions (earlier: beta.chat.completions).
    return getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse


@pytest.mark.parametrize("seed", [0, 1])
def test_the_openai_parse_helper_gets_a_valid_object(client, seed):
    r = _parse(client)(model="tiny", messages=MSG, response_format=Pet, max_tokens=80, temperature=1.0, seed=seed)
    assert r.choices[0].finish_reason == "stop"
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet), r.choices[0].message.content


@pytest.mark.parametrize(
    ("response_format", "seed"),
    [
        ({"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}, 0),
        # Any object: an open string can run to max_tokens with random weights; this seed ends
        # (after 77 tokens of keys and values: not just "{}").
        ({"type": "json_object"}, 7),
    ],
    ids=["json_schema", "json_object"],
)
def test_structured_output_streams_a_valid_document(client, response_format, seed):
    text, reasons = "", []
    for chunk in client.chat.completions.create(
        model="tiny", messages=MSG, response_format=response_format, max_tokens=150, temperature=1.0, seed=seed, stream=True
    ):
        for c in chunk.choices:
            text += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop" and isinstance(json.loads(text), dict), text
    if response_format["type"] == "json_schema":
        Pet.model_validate_json(text)


def test_completions_take_response_format_too(client):
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}
    r = client.completions.create(
        model="tiny", prompt="pet:", max_tokens=80, temperature=1.0, seed=2, n=2, extra_body={"response_format": rf}
    )
    for c in r.choices:
        Pet.model_validate_json(c.text)


def test_a_bad_schema_is_a_400_naming_response_format(client):
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, response_format=rf, stream=True)
    assert e.value.body["param"] == "response_format" and "response_format" in e.value.body["message"]


def test_text_format_is_unconstrained(client):
    r = client.chat.completions.create(
        model="tiny", messages=MSG, response_format={"type": "text"}, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
