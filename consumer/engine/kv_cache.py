"""The KV cache the engine decodes with on CPUs (KV_CACHE=static): preallocated, read only where filled.

transformers' StaticCache preallocates every layer's keys and values for prompt + max_new_tokens
positions and updates them in place, which on a CPU beat the default DynamicCache (that one copies
the whole cache at every token to grow it). But it hands attention the whole preallocated length,
masked, at every step: at the first new token of a 1024x768 diagram, 870 positions are filled out
of 1254 and attention still reads all 1254. `FilledStaticCache` keeps the preallocated buffers and
hands attention a view of the filled prefix (no copy), with masks sized to match, exactly as a
dynamic cache of the same contents would.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer


class FilledStaticLayer(StaticLayer):
    """A StaticLayer whose keys and values, as attention sees them, end at the last filled position."""

    def __init__(self, max_cache_len: int, **kwargs: Any) -> None:
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        # The count StaticLayer keeps in `cumulative_length`, on the host: reading that tensor back
        # from a GPU at every layer and step would stall the stream.
        self.filled = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.filled += key_states.shape[-2]
        return keys[:, :, : self.filled], values[:, :, : self.filled]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Called before `update` adds the query's positions: the mask covers what attention will see.
        return self.filled + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.filled = 0


class FilledStaticCache(StaticCache):
    """StaticCache with FilledStaticLayer layers: pass it to `generate(cache=...)`."""

    def __init__(self, config: Any, max_cache_len: int, **kwargs: Any) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        layers: list[Any] = self.layers  # type: ignore[has-type]  # set by StaticCache.__init__
        if any(type(layer) is not StaticLayer for layer in layers):
            raise ValueError("FilledStaticCache supports full-attention layers only (no sliding window)")
        self.layers = [FilledStaticLayer(max_cache_len=max_cache_len) for _ in layers]
