"""Speculative decoding: greedy output is the plain decoder's token for token (prompt lookup and
a draft model, with drafts accepted and rejected), the paged cache is rolled back cleanly, the
acceptance rule keeps the target's sampling distribution, and the server streams with it on."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.config import EngineConfig, SpeculativeConfig
from inferd.engine.sequence import Sequence
from inferd.engine.speculative import SpecDecoder, SpecGate, propose_ngram, verify
from inferd.layers.sampler import Sampler
from inferd.testing import make_model

GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def repetitive_prompts(n: int, vocab: int = 512, seed: int = 5) -> list[list[int]]:
    """A random phrase said three times, then its start: prompt lookup has something to copy."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        phrase = [rng.randrange(2, vocab) for _ in range(rng.randrange(12, 30))]
        prompts.append(phrase * 3 + phrase[:4])
    return prompts


@pytest.fixture(scope="module")
def plain(llama_dir):
    return LLM(str(llama_dir), enable_prefix_caching=False)


@pytest.fixture(scope="module")
def near_twin(llama_dir, tmp_path_factory):
    """A draft model: the target with noise on its weights, so it agrees often but not always."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("draft-twin")
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * 0.03)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(path)
    return path


def spec_llm(llama_dir, **spec) -> LLM:
    """These tests count drafts: the gate, whose pauses follow this machine's timing, is off
    (its own tests below drive it with a clock of their own)."""
    return LLM(str(llama_dir), speculative={"adaptive": False, **spec})


def test_prompt_lookup_finds_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, 1, 3) == [7, 8]
    assert propose_ngram([5, 6, 5, 6, 4, 6], 3, 1, 2) == [4, 6]  # no 2-gram "4 6" earlier: the 1-gram "6"
    assert propose_ngram([1, 2, 3, 4], 3, 1, 4) == []


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_spec_output_is_the_plain_output(llama_dir, near_twin, plain, method):
    prompts = repetitive_prompts(4) + [[random.Random(9).randrange(2, 512) for _ in range(40)]]
    extra = {"draft_model": str(near_twin)} if method == "draft_model" else {}
    llm = spec_llm(llama_dir, method=method, num_speculative_tokens=4, **extra)
    bm = llm.engine.block_manager
    free_at_start = bm.num_free
    want = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == want
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens > 0, "no draft was accepted: nothing sped up"
    assert stats.spec_draft_tokens > stats.spec_accepted_tokens, "no draft was rejected: rollback never ran"
    assert bm.num_free == free_at_start  # every block back, rejected drafts' included
    assert sum(b.ref_count for b in bm.blocks) == 0


def test_a_batch_too_wide_for_decode_rows_verifies_on_the_chunked_prefill_path(llama_dir, plain):
    llm = spec_llm(llama_dir, method="ngram", num_speculative_tokens=4)
    llm.engine.runner.max_decode_rows = 0  # every verify pass takes the k + 1 token chunk path
    chunked = llm.engine.runner.step_logits
    calls = []

    def recording(views, is_prefill, all_positions=False):
        calls.append(all_positions)
        return chunked(views, is_prefill, all_positions)

    llm.engine.runner.step_logits = recording
    prompts = repetitive_prompts(3, seed=13)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert calls and all(calls)
    stats = llm.engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens


def test_token_ids_past_the_draft_vocabulary_are_drafted_on_without_a_crash(llama_dir, plain, tmp_path):
    """A prompt given as ids (or a target-only padding id) may hold ids the draft's smaller
    embedding lacks: the draft reads another id there, and verification keeps the output exact."""
    draft = tmp_path / "narrow"
    make_model(draft, vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (draft / name).unlink(missing_ok=True)
    llm = spec_llm(llama_dir, method="draft_model", draft_model=str(draft), num_speculative_tokens=3)
    narrow = [t % 400 for t in repetitive_prompts(1, seed=14)[0]]
    wide = narrow[:-1] + [450]
    got = [o.token_ids for o in llm.generate([wide, narrow], GREEDY)]
    assert got == [o.token_ids for o in plain.generate([wide, narrow], GREEDY)]
    assert llm.engine.stats().spec_draft_tokens > 0


def test_a_draft_model_that_is_the_target_has_every_draft_accepted(llama_dir, plain):
    llm = spec_llm(llama_dir, method="draft_model", draft_model=str(llama_dir), num_speculative_tokens=3)
    prompts = repetitive_prompts(2, seed=11)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [o.token_ids for o in plain.generate(prompts, GREEDY)]
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens


def test_prefix_cache_after_a_spec_request_holds_only_verified_tokens(llama_dir, plain):
    """Blocks completed by a speculative step are hashed only for verified tokens: a later prompt
    that extends the first request's output hits them and continues as plain decoding does."""
    llm = spec_llm(llama_dir, method="ngram", num_speculative_tokens=5)
    prompt = repetitive_prompts(1, seed=3)[0]
    first = llm.generate([prompt], GREEDY)[0]
    follow = prompt + first.token_ids[:40]
    again = llm.generate([follow], GREEDY)[0]
    assert again.num_cached_tokens >= (len(follow) - 1) // 16 * 16 > len(prompt)
    assert again.token_ids == plain.generate([follow], GREEDY)[0].token_ids


def test_stop_token_inside_accepted_drafts_ends_the_request_there(llama_dir, plain):
    prompt = repetitive_prompts(1, seed=4)[0]
    full = plain.generate([prompt], GREEDY)[0].token_ids
    stop = full[10]
    want = plain.generate([prompt], SamplingParams(max_tokens=48, temperature=0.0, stop_token_ids=[stop]))[0]
    llm = spec_llm(llama_dir, method="ngram", num_speculative_tokens=6)
    got = llm.generate([prompt], SamplingParams(max_tokens=48, temperature=0.0, stop_token_ids=[stop]))[0]
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "stop"
    short = llm.generate([prompt], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))[0]
    assert short.token_ids == full[:7] and short.finish_reason == "length"


def test_sampled_spec_requests_run_and_seeds_repeat(llama_dir, near_twin):
    for spec in ({"method": "ngram"}, {"method": "draft_model", "draft_model": str(near_twin)}):
        llm = spec_llm(llama_dir, num_speculative_tokens=4, **spec)
        params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=123, ignore_eos=True)
        prompts = repetitive_prompts(3, seed=8)
        a = [o.token_ids for o in llm.generate(prompts, params)]
        b = [o.token_ids for o in llm.generate(prompts, params)]
        assert a == b and all(len(t) == 30 for t in a)
        assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks


def test_without_an_ngram_match_steps_are_launched_ahead_and_output_is_unchanged(llama_dir, plain):
    """Prompt lookup speculates only while the newest tokens occur earlier: a prompt of distinct
    tokens decodes with plain steps launched ahead (a step in flight while the host reads the one
    before), and drafts resume once the output repeats something."""
    llm = spec_llm(llama_dir, method="ngram", num_speculative_tokens=4)
    prompt = random.Random(21).sample(range(2, 512), 40)  # no token twice: nothing to look up
    launched = []
    launch = llm.engine.runner.launch

    def recording(batch, is_prefill, prev):
        launched.append((is_prefill, prev is not None))
        return launch(batch, is_prefill, prev)

    llm.engine.runner.launch = recording
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    got = llm.generate([prompt], params)[0]
    assert got.token_ids == plain.generate([prompt], params)[0].token_ids
    assert (False, True) in launched, "no decode step was launched ahead of the previous one's tokens"
    assert llm.engine.stats().spec_draft_tokens > 0, "the output's repeats were never drafted from"


def test_the_lookup_check_skips_the_token_still_in_flight():
    from inferd.engine.sequence import PENDING_TOKEN

    spec = SpecDecoder(SpeculativeConfig(method="ngram", ngram_min=2, ngram_max=3), None, 4096)
    seq = Sequence([5, 6, 7, 5, 6], SamplingParams(max_tokens=8), 16)
    assert spec.wants([seq])  # "5 6" occurred before
    seq.token_ids.append(PENDING_TOKEN)
    seq.pending_row = 0
    assert spec.wants([seq])  # still judged on what the host has
    seq.token_ids[-1], seq.pending_row = 9, None
    assert not spec.wants([seq])  # "6 9" never did
    done = Sequence([5, 6, 7, 5, 6], SamplingParams(max_tokens=1), 16)
    assert not spec.wants([done])  # no room left for a draft


def test_only_a_lone_greedy_sequence_pays_for_rows_computed_as_one():
    """Bit-for-bit verify rows (the GPU's rows_as_one, 2.2 plain steps a pass against 1.4) serve
    greedy output's equality with plain decoding; a sampled request's draws differ from plain
    decoding's anyway, so its verify pass takes the batch kernels."""
    from types import SimpleNamespace

    asked = []
    runner = SimpleNamespace(max_decode_rows=64, verify_rows=[2, 3, 4, 5])
    runner.step_logits = lambda views, is_prefill, as_one: asked.append((len(views), is_prefill, as_one))

    def seq(**kw):
        return Sequence([5, 6, 7], SamplingParams(max_tokens=8, **kw), 16)

    greedy, sampled = seq(temperature=0.0), seq(temperature=0.7, seed=1)
    SpecDecoder._verify_logits(runner, [greedy], [[1, 2, 3, 4]])
    SpecDecoder._verify_logits(runner, [sampled], [[1, 2, 3, 4]])
    SpecDecoder._verify_logits(runner, [greedy, seq(temperature=0.0)], [[1, 2], [3]])
    runner.verify_rows = []  # a runner without verify graphs (no GEMV pass, CPU)
    SpecDecoder._verify_logits(runner, [greedy], [[1, 2, 3, 4]])
    assert asked == [(5, False, True), (5, False, False), (5, False, False), (5, False, False)]


def test_requests_needing_the_plain_sampler_fall_back_to_plain_steps(llama_dir, plain):
    llm = spec_llm(llama_dir, method="ngram")
    prompt = repetitive_prompts(1, seed=6)[0]
    params = SamplingParams(max_tokens=20, temperature=0.0, logprobs=True, ignore_eos=True)
    got = llm.generate([prompt], params)[0]
    want = plain.generate([prompt], params)[0]
    assert got.token_ids == want.token_ids and len(got.logprobs) == 20
    assert llm.engine.stats().spec_draft_tokens == 0


# ---- the acceptance rule keeps the target's distribution ------------------------------------
# The 99.99th percentile of chi-square with 7 degrees of freedom: a correct rule fails 1 in 10,000.
CHI2_7DF_P9999 = 29.88


def first_token_counts(p_logits: torch.Tensor, drafts: list[list[int]], q: torch.Tensor | None) -> torch.Tensor:
    """How often each token is the first one a speculative step emits, over sequences each
    verifying its drafts against the same target logits."""
    params = SamplingParams(temperature=1.0, max_tokens=8)
    trials = len(drafts)
    seqs = [Sequence([1, 2], params, 16) for _ in range(trials)]
    logits = p_logits.repeat(trials, 1)
    qs = None if q is None else [list(q) for _ in range(trials)]
    gained = verify(logits, seqs, drafts, qs, Sampler(torch.device("cpu")))
    return torch.bincount(torch.tensor([g[0] for g in gained]), minlength=p_logits.shape[1]).float()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft", ["point mass (prompt lookup)", "draft model distribution"])
def test_first_token_follows_the_target_softmax(draft):
    torch.manual_seed(0)
    vocab, trials = 8, 20000
    p_logits = torch.randn(3, vocab)  # two draft positions and the bonus
    target = p_logits[0].softmax(-1)
    if draft.startswith("draft model"):
        q = torch.randn(2, vocab).mul(2).softmax(-1)  # far from the target: many rejections
        drafts = torch.multinomial(q, trials, replacement=True).T.tolist()  # drafts are drawn from q
    else:
        q, drafts = None, [[int(target.argmax()), 3]] * trials
    counts = first_token_counts(p_logits, drafts, q)
    assert chi_square(counts, target) < CHI2_7DF_P9999, (counts / trials, target)


def test_a_draft_equal_to_the_target_is_always_accepted():
    torch.manual_seed(1)
    p_logits = torch.randn(2, 8)
    q = p_logits[:1].softmax(-1)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    seqs = [Sequence([1], params, 16) for _ in range(500)]
    drafts = [[int(torch.multinomial(q[0], 1))] for _ in seqs]
    gained = verify(p_logits.repeat(500, 1), seqs, drafts, [[q[0]] for _ in seqs], Sampler(torch.device("cpu")))
    assert all(g[0] == d[0] and len(g) == 2 for g, d in zip(gained, drafts))


# ---- the gate: speculation pauses while it measures slower ---------------------------------------
def test_the_gate_measures_plain_decoding_then_pauses_a_losing_speculation_for_ever_longer():
    gate = SpecGate(True)
    assert gate.allows()  # speculation starts at once
    for _ in range(SpecGate.SPEC_WINDOW):
        gate.record(True, 2, 1.0, 1)  # 2 tokens/s
    assert not gate.allows()  # plain decoding not measured yet: measured first
    for _ in range(SpecGate.PLAIN_WINDOW):
        gate.record(False, 1, 0.25, 1)  # 4 tokens/s
    assert gate.allows()
    pauses = []
    for _ in range(8):
        for _ in range(SpecGate.SPEC_WINDOW):
            gate.record(True, 2, 1.0, 1)
        pauses.append(gate.pause)
        while not gate.allows():
            gate.record(False, 1, 0.25, 1)
    assert pauses == [16, 32, 64, 128, 256, 512, 1024, 1024]
    assert gate.paused_steps == SpecGate.PLAIN_WINDOW + sum(pauses)
    for _ in range(SpecGate.SPEC_WINDOW):
        gate.record(True, 20, 1.0, 1)  # the drafts pay now: speculation stays on, the next pause is short again
    assert gate.allows() and gate.next_pause == SpecGate.MIN_PAUSE
    # A window's median decides: one slow step (a long gap) does not pause it, as a mean would.
    for rate in (5, 5, 0.01, 5):
        gate.record(True, rate, 1.0, 1)
    assert gate.allows()


def test_the_gate_compares_steps_of_the_same_batch_size():
    """Plain decoding measured at one sequence says nothing about 16: speculation at 16 first
    waits for plain steps at 16, and is judged against those."""
    gate = SpecGate(True)
    for _ in range(SpecGate.PLAIN_WINDOW):
        gate.record(False, 1, 0.25, 1)  # 4 tokens/s at batch 1
    for _ in range(SpecGate.SPEC_WINDOW):
        gate.record(True, 40, 1.0, 16)  # 40 tokens/s at batch 16: beats batch 1's 4, but not measured against it
    assert gate.pause == SpecGate.PLAIN_WINDOW
    for _ in range(SpecGate.PLAIN_WINDOW):
        gate.record(False, 16, 0.25, 16)  # 64 tokens/s at batch 16
    for _ in range(SpecGate.SPEC_WINDOW):
        gate.record(True, 40, 1.0, 16)
    assert gate.pause == SpecGate.MIN_PAUSE  # slower than plain at 16
    for _ in range(SpecGate.MIN_PAUSE):
        gate.record(False, 16, 0.25, 16)
    for _ in range(SpecGate.SPEC_WINDOW):
        gate.record(True, 3, 0.5, 1)  # 6 tokens/s at batch 1 beats 4
    assert gate.allows()


def test_a_gate_that_is_off_never_pauses():
    gate = SpecGate(False)
    for _ in range(100):
        gate.record(True, 1, 100.0, 1)
        gate.record(False, 100, 1.0, 1)
    assert gate.allows() and gate.paused_steps == 0


def test_a_draft_model_that_measures_slower_is_paused_and_retried_and_the_output_stays_plain(llama_dir, near_twin, plain):
    """The engine's clock: a plain step takes 1, a speculative step 10 (the draft model's steps and
    the verify pass). Speculation loses, so the engine pauses it for longer each time, tries it
    again in between, and the greedy output is the plain decoder's throughout."""
    llm = LLM(
        str(llama_dir),
        speculative={"method": "draft_model", "draft_model": str(near_twin), "num_speculative_tokens": 4},
    )
    spec = llm.engine.spec
    clock = {"now": 0.0}
    kinds = []

    def tick():
        clock["now"] += 1.0
        return clock["now"]

    real_step = spec.step

    def slow_step(runner, bm, batch):
        clock["now"] += 9.0
        kinds.append("S")
        return real_step(runner, bm, batch)

    spec.gate.clock, spec.step = tick, slow_step
    recorded = []
    record = spec.gate.record
    spec.gate.record = lambda *a: (recorded.append(a), record(*a))
    launch = llm.engine.runner.launch

    def plain_launch(batch, is_prefill, prev=None):
        kinds.append("p" if is_prefill else "P")
        return launch(batch, is_prefill, prev)

    llm.engine.runner.launch = plain_launch
    prompt = repetitive_prompts(1, seed=21)
    params = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompt, params)] == [o.token_ids for o in plain.generate(prompt, params)]
    runs = [(k, len(list(g))) for k, g in itertools.groupby("".join(kinds).lstrip("p"))]
    # A window of speculative steps, plain steps to measure plain decoding, then pauses that double;
    # one plain step more each time: the first after a speculative step is not timed (nothing ran
    # before it, so its interval is no step of the device's).
    window = ("S", SpecGate.SPEC_WINDOW)
    want = [window, ("P", SpecGate.PLAIN_WINDOW + 1), window, ("P", 17), window, ("P", 33), window, ("P", 65)]
    assert runs[:8] == want, runs
    assert {a[2] for a in recorded if a[0]} == {10.0} and {a[2] for a in recorded if not a[0]} == {1.0}
    # An idle engine between requests is no step's time.
    clock["now"] += 3600.0
    llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert max(a[2] for a in recorded) == 10.0
    assert llm.engine.stats().spec_paused_steps == spec.gate.paused_steps > 0


# The 99.99th percentile of chi-square with 3 degrees of freedom.
CHI2_3DF_P9999 = 21.11


def test_through_the_engine_a_drafted_token_follows_the_target_distribution(llama_dir, near_twin):
    """Top-k 4 makes the target's distribution four tokens wide. The first output token is
    sampled plainly; the second by a speculative step (one draft from the near twin, whose top 4
    differ from the target's: rejections and residual draws). Given the most common first token,
    the second's frequencies must be the target's softmax there."""
    from collections import Counter

    from inferd.testing import prefill_logits

    trials = 600
    spec = {"method": "draft_model", "draft_model": str(near_twin), "num_speculative_tokens": 1, "adaptive": False}
    llm = LLM(str(llama_dir), max_num_seqs=256, max_num_waiting=trials, speculative=spec)
    prompt = repetitive_prompts(1, seed=12)[0]
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=i, ignore_eos=True) for i in range(trials)]
    outs = llm.generate([prompt] * trials, params)
    first = Counter(o.token_ids[0] for o in outs).most_common(1)[0][0]
    seconds = Counter(o.token_ids[1] for o in outs if o.token_ids[0] == first)
    stats = llm.engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    top = prefill_logits(llm, prompt + [first])[-1].float().topk(4)
    assert set(seconds) <= set(top.indices.tolist())
    counts = torch.tensor([float(seconds[t]) for t in top.indices.tolist()])
    assert chi_square(counts, top.values.softmax(-1)) < CHI2_3DF_P9999, (counts, top.values.softmax(-1))


# ---- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, words",
    [
        ({"method": "medusa"}, "speculative.method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_min <= ngram_max"),
        ({"method": "draft_model"}, "draft_model"),
        ({"method": "ngram", "k": 4}, "unknown setting"),
        ({"num_speculative_tokens": 4}, "needs a method"),
        ({"method": "ngram", "adaptive": "yes"}, "adaptive must be true or false"),
    ],
)
def test_bad_speculative_settings_are_refused_by_name(spec, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(model="m", speculative=spec)


def test_speculative_refuses_tensor_parallelism():
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        EngineConfig(model="m", tensor_parallel_size=2, speculative=SpeculativeConfig(method="ngram"))


def test_a_draft_model_with_another_tokenizer_is_refused(llama_dir, tmp_path):
    other = tmp_path / "other"
    make_model(other, vocab_size=300)
    with pytest.raises(ValueError, match="different tokenizer"):
        spec_llm(llama_dir, method="draft_model", draft_model=str(other))


# ---- through the server ------------------------------------------------------------------------
def test_the_server_streams_with_prompt_lookup_and_exports_the_acceptance(llama_dir, make_live_server, plain):
    import httpx
    import openai

    text = "The quick brown fox jumps over the lazy dog. " * 4 + "The quick"
    want = plain.generate([text], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].text
    server = make_live_server(llama_dir, speculative={"method": "ngram", "num_speculative_tokens": 4})
    metrics = httpx.get(server.url + "/metrics", headers=server.auth("olivia")).text
    assert "inferd_spec_decode_draft_tokens_total 0.0" in metrics
    assert "inferd_spec_decode_accepted_tokens_total 0.0" in metrics
    assert "inferd_spec_decode_paused_steps_total 0.0" in metrics
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys["alice"], max_retries=0)
    stream = client.completions.create(
        model="tiny", prompt=text, max_tokens=24, temperature=0.0, stream=True, extra_body={"ignore_eos": True}
    )
    got = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert got == want
    metrics = httpx.get(server.url + "/metrics", headers=server.auth("olivia")).text
    drafted = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("inferd_spec_decode_draft"))
    assert drafted > 0


def test_speculative_settings_come_from_the_server_config_and_flags(tmp_path):
    from inferd.cli import _speculative_flags, build_parser
    from inferd.server.config import load_config

    cfg = tmp_path / "inferd.yaml"
    cfg.write_text("model: m\nspeculative:\n  method: ngram\n  num_speculative_tokens: 6\n")
    assert load_config(str(cfg)).engine.speculative == SpeculativeConfig(method="ngram", num_speculative_tokens=6)
    args = build_parser().parse_args(["serve", "--speculative-method", "draft_model", "--speculative-draft-model", "/d"])
    flags = _speculative_flags(args)
    assert load_config(str(cfg), speculative=flags).engine.speculative.draft_model == "/d"
    assert load_config(str(cfg), speculative=flags).engine.speculative.adaptive is True
    args = build_parser().parse_args(["serve", "--speculative-method", "ngram", "--no-speculative-adaptive"])
    assert load_config(str(cfg), speculative=_speculative_flags(args)).engine.speculative.adaptive is False
    cfg.write_text("model: m\nspeculative:\n  method: ngram\n  num_speculative_tokens: 99\n")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        load_config(str(cfg))
