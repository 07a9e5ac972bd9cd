"""transformers 5.23 causal LMs as one decode step whose KV cache torch.export sees.

transformers' own export wrapper (integrations/executorch.py, TorchExportableModuleWithStaticCache)
registers its StaticCache's tensors as the module's buffers, but the cache object keeps its own
references to them. torch.export (non-strict, torch 2.13's default) swaps the module's buffers for
traced ones while the cache still writes to the originals, which it lifts as constants
(`lifted_tensor_*`): the program mutates no buffer (`graph_signature.buffers_to_mutate` is empty),
so an .onnx has no state outputs and a .pte's cache is a constant. Eager and `ep.module()` still
agree call after call (the unlifted constants are written in place), so nothing in transformers
notices. Also, StaticLayer.update (cache_utils.py:480) writes at its own counter
`cumulative_length`, not at the cache position the caller passes.

`CausalLMStep` points each cache layer at the module's buffers at every call, so the writes are
the program's buffer mutations, and writes at the step's `position` input: the keys and values are
the only state, as in models/generator.py.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


class CausalLMStep(nn.Module):
    """forward(token (1, 1) int64, position (1,) int64) -> logits (1, vocab) of a transformers causal
    LM built from `config` with `fields` (LlamaConfig, Qwen2Config, GPT2Config, ...), its keys and
    values in buffers `key_cache_<i>` / `value_cache_<i>` (1, kv heads, max_length, head width),
    left out of the state dict (they are state, not weights). Its weights are the LM's own under
    `net.`."""

    def __init__(self, model: str, config: str, fields: Mapping[str, Any], max_length: int):
        super().__init__()
        from hydra.utils import get_object
        from omegaconf import DictConfig, OmegaConf

        from .torchvision import importable

        importable()  # before transformers is imported: it imports torchvision whenever installed
        from transformers import StaticCache

        fields = OmegaConf.to_container(fields) if isinstance(fields, DictConfig) else dict(fields)
        self.net = get_object(model)(get_object(config)(**fields)).eval()
        text = self.net.config.get_text_config()
        self.cache = StaticCache(config=text, max_cache_len=max_length)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_width = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.cache.early_initialization(1, heads, head_width, torch.float32, torch.device("cpu"))
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", torch.zeros_like(layer.keys), persistent=False)
            self.register_buffer(f"value_cache_{i}", torch.zeros_like(layer.values), persistent=False)

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            layer.update = _writes_at(layer, position)
            layer.cumulative_length = position.reshape(())  # the mask's query offset (get_seq_length)
        out = self.net(input_ids=token, cache_position=position, position_ids=position[None],
                       past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]


def _writes_at(layer, position: torch.Tensor):
    """The layer's update, writing this call's keys and values at `position` in its buffers."""

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        layer.keys.index_copy_(2, position, key_states)
        layer.values.index_copy_(2, position, value_states)
        return layer.keys, layer.values

    return update
