"""A `ModelRunner` whose weights are random and made on its own GPU, shard by shard: each rank
builds the model on the meta device at the group's size (so every layer already has this rank's
shape), then allocates and fills one layer at a time. The 70B shape (141 GB in bf16) never
exists whole anywhere, and in fp8 each projection is quantized as soon as it is made, so a 70B
fp8 model fits one H200 (its bf16 weights would not). Imported by name in the worker processes
(spawn), hence a module of its own."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from inferd.engine.model_runner import ModelRunner
from inferd.layers.distributed import tp_rank
from inferd.layers.norm import RMSNorm
from inferd.layers.quantize import FP8_VARIANTS, Fp8Linear, _replace, plan_fp8
from inferd.layers.rotary import RotaryEmbedding
from inferd.models.registry import model_class

log = logging.getLogger("bench.random_shards")


class RandomShardRunner(ModelRunner):
    def _load_model(self, weights, weight_bytes) -> None:
        start = time.perf_counter()
        cfg, dev, dtype = self.model_cfg, self.device, self.dtype
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                model = model_class(cfg)(cfg, self.max_model_len)
            with torch.device(dev):
                rotary = RotaryEmbedding(cfg.head_dim, self.max_model_len, cfg.rope_theta, cfg.rope_scaling)
        finally:
            torch.set_default_dtype(default_dtype)
        plan = plan_fp8(model) if self.config.quantization == "fp8" else None
        fp8 = set(plan.fp8) if plan else set()
        hands = set(plan.hands_product) if plan else set()
        gen = torch.Generator(dev).manual_seed(1 + tp_rank())

        def real(p: torch.Tensor, ones: bool) -> nn.Parameter:
            t = torch.empty(p.shape, dtype=dtype, device=dev)
            t.fill_(1.0) if ones else t.normal_(0.0, 0.02, generator=gen)
            return nn.Parameter(t, requires_grad=False)

        for name, module in list(model.named_modules()):
            if isinstance(module, RotaryEmbedding):
                module.cos_sin = rotary.cos_sin
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    setattr(module, pname, real(p, ones=isinstance(module, RMSNorm)))
            if name in fp8:
                _replace(model, name, Fp8Linear(module, name in hands))
                module.weight = None
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        if plan is not None:
            for name in {*plan.finishes_product, *plan.hands_rows}:
                module = model.get_submodule(name)
                module.__class__ = FP8_VARIANTS[type(module)]
                if name in plan.hands_rows:
                    module.hands_rows = "fp8"
        self.model = model
        self._fuse_for_batch_one()  # as the engine's own loading does (the GEMV kernels at one row)
        self.model.eval()
        torch.cuda.synchronize(dev) if self.is_cuda else None
        log.info("random shard: %.2f GB on %s in %.1fs", self.weight_bytes() / 1e9, dev, time.perf_counter() - start)
