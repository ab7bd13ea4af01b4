"""Tiny random-weight models in Hugging Face format, for tests and the demo. Built with
`transformers` (save_pretrained) and a byte-level BPE tokenizer trained with `tokenizers`;
nothing is downloaded. Needs the dev extra (transformers)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Banks and hospitals run DeepSeek models on their own GPU servers.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching lets requests join and leave between steps.",
    "0123456789 !?.,;:-+*/()[]{}<>= abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
] * 20


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a small corpus, wrapped the way HF saves it."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE)


def make_model(
    path,
    arch: str = "llama",
    *,
    vocab_size=512,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    tie=False,
    rope_scaling=None,
    max_pos=1024,
    seed=0,
    intermediate=128,
):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocab_size)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common, rope_theta=500000.0, rope_scaling=rope_scaling)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**common, rope_theta=10000.0)
        model = Qwen2ForCausalLM(cfg)
    # Larger-than-default init so logits are spread out: near-ties would make greedy checks flaky.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model = model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def prefill_logits(llm, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits of one prompt (a prefill through the engine's model), in the model's dtype,
    on the CPU."""
    from inferd.layers.context import AttentionContext, reset_context, set_context

    runner = llm.engine.runner
    positions = torch.arange(len(ids), device=runner.device)
    set_context(AttentionContext(is_prefill=True, query_lens=[len(ids)], context_lens_list=[len(ids)], slot_mapping=positions))
    try:
        with torch.no_grad():
            model = runner.model
            return model.compute_logits(model(torch.tensor(ids, device=runner.device), positions)).cpu()
    finally:
        reset_context()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Exactly n greedy tokens from a transformers model (no EOS stop), the reference for ours."""
    x = torch.tensor([ids])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=None,
    )
    return out[0, len(ids) :].tolist()


def force_drafts(spec, oracle: list[int]) -> None:
    """Make a speculative decoder draft on every step, its drafts the next tokens of `oracle` (a
    plain greedy output of the request: mostly accepted)."""

    def draft(batch, ks, sampler):
        return [[oracle[min(s.num_output_tokens + j, len(oracle) - 1)] for j in range(k)] for s, k in zip(batch, ks)], None

    spec._draft, spec.wants = draft, (lambda seqs: True)


def compare_verify_rows(engine, prompt: list[int], oracle: list[int], max_tokens: int) -> dict:
    """Speculative decoding's verify passes against plain decoding, row by row: greedy `prompt`
    for `max_tokens` in an engine with speculation, every step drafting the next tokens of
    `oracle` (a plain greedy output of the prompt, so drafts are mostly accepted and the passes
    cover its positions). Each verify row's logits are compared with those of the 1-row decode
    step plain decoding takes at the same position, in the same cache. Returns counts: rows,
    bitwise_equal, argmax_differs, and max_abs_diff / max_logit."""
    from inferd import SamplingParams
    from inferd.engine import speculative
    from inferd.engine.speculative import Chunk

    runner, spec = engine.runner, engine.spec
    stats = {"rows": 0, "bitwise_equal": 0, "argmax_differs": 0, "max_abs_diff": 0.0, "max_logit": 0.0}
    real_verify = speculative.verify

    def verify(logits, seqs, drafts, qs, sampler):
        for s, d in zip(seqs, drafts):
            tokens = s.token_ids + d
            for j in range(len(d) + 1):
                one = runner.step_logits([Chunk(tokens[: len(s) + j], s.block_table, len(s) + j - 1, 1)], is_prefill=False)[0]
                row = logits[j].to(one.dtype)
                stats["rows"] += 1
                stats["bitwise_equal"] += int(torch.equal(one, row))
                stats["argmax_differs"] += int(one.argmax().item() != row.argmax().item())
                stats["max_abs_diff"] = max(stats["max_abs_diff"], (one.float() - row.float()).abs().max().item())
                stats["max_logit"] = max(stats["max_logit"], one.float().abs().max().item())
        return real_verify(logits, seqs, drafts, qs, sampler)

    real_draft, real_wants = spec._draft, spec.wants
    force_drafts(spec, oracle)
    speculative.verify = verify
    try:
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        speculative.verify = real_verify
        spec._draft, spec.wants = real_draft, real_wants
    return stats
