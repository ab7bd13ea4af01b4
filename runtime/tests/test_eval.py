"""`inferd eval`: perplexity through the engine's prompt logprobs equals transformers' on the same
windows, a model agrees with itself completely, and bad input exits 2 with the problem named."""

from __future__ import annotations

import json
import math

import pytest
import torch

from inferd.cli import main
from inferd.eval import EvalSettings, greedy_agreement, run_eval, windows
from inferd.testing import CORPUS, make_model

CPU = dict(device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-llama")
    model, tokenizer = make_model(path, arch="llama", heads=4, kv_heads=2)
    text = path / "text.txt"
    text.write_text(" ".join(CORPUS[:12]))
    return path, model.eval(), tokenizer, text


@pytest.mark.parametrize("n,window,stride", [(10, 32, 16), (100, 32, 16), (100, 32, 32), (101, 31, 7), (2, 5, 5)])
def test_windows_score_every_position_after_the_first_exactly_once(n, window, stride):
    spans = windows(n, window, stride)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, n))
    assert all(end - begin <= window and begin < first for begin, end, first in spans)


def test_perplexity_is_exp_of_the_mean_nll_that_transformers_computes_on_the_same_windows(tiny):
    path, model, tokenizer, text = tiny
    settings = EvalSettings(max_model_len=33, stride=12, greedy_prompts=0)
    result = run_eval(str(path), str(text), CPU, None, settings)
    ids = tokenizer(text.read_text())["input_ids"]
    assert result["text_tokens"] == len(ids) > 3 * settings.window  # several windows
    nll = []
    with torch.no_grad():
        for begin, end, first in windows(len(ids), settings.window, 12):
            logprobs = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].double(), dim=-1)
            nll += [-logprobs[pos - 1 - begin, ids[pos]].item() for pos in range(first, end)]
    want = math.exp(sum(nll) / len(nll))
    assert result["candidate"]["scored_tokens"] == len(ids) - 1
    assert result["candidate"]["perplexity"] == pytest.approx(want, rel=1e-4)
    assert result["reference"] is None and result["agreement"] is None


def test_a_model_agrees_with_itself_completely(tiny):
    path, _, _, text = tiny
    settings = EvalSettings(max_model_len=64, greedy_prompts=3, prompt_tokens=8, greedy_tokens=12)
    result = run_eval(str(path), str(text), CPU, CPU, settings)
    agreement = result["agreement"]
    assert agreement["top1_teacher_forced"] == 1.0
    assert agreement["greedy"] == {"until_first_divergence": 1.0, "overall": 1.0}
    assert agreement["greedy_prompts"] == 3
    assert result["candidate"]["perplexity"] == result["reference"]["perplexity"]


def test_greedy_agreement_counts_until_the_first_divergence_and_overall():
    got = greedy_agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert got == {"until_first_divergence": (2 / 4 + 1) / 2, "overall": 7 / 8}


def test_the_cli_prints_json_and_writes_it(tiny, tmp_path, capsys):
    path, _, _, text = tiny
    out = tmp_path / "eval.json"
    argv = ["eval", str(path), "--text", str(text), "--quantization", "int8", "--max-model-len", "64"]
    assert main([*argv, "--greedy-prompts", "2", "--prompt-tokens", "8", "--greedy-tokens", "8", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["candidate"]["settings"]["quantization"] == "int8"
    assert printed["reference"]["settings"]["quantization"] is None
    assert 0 <= printed["agreement"]["top1_teacher_forced"] <= 1


@pytest.mark.parametrize(
    "content,extra,message",
    [
        (None, [], "cannot read the text file"),
        (b"\xff\xfe\x00bad", [], "not UTF-8 text"),
        (b"fox", [], "eval needs at least 65 (--prompt-tokens + 1)"),
        (b"", ["--prompt-tokens", "1"], "the text has 1 tokens; eval needs at least 2"),
        (b"fox", ["--prompt-tokens", "160", "--greedy-tokens", "60"], "exceed --max-model-len 200"),
        (b"fox", ["--stride", "300"], "--stride must be in [1, 199]"),
    ],
)
def test_bad_text_or_settings_exit_2_naming_the_problem(tiny, tmp_path, capsys, content, extra, message):
    path = tiny[0]
    text = tmp_path / "text.txt"
    if content is not None:
        text.write_bytes(content)
    assert main(["eval", str(path), "--text", str(text), "--max-model-len", "200", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err, err
