"""The KV cache: keys and values of the tokens processed so far, per layer, with their positions.

With a causal mask the key and value of a token never change once computed, so decoding feeds
only the new token and reads the earlier keys and values from a cache (Shazeer 2019, "Fast
Transformer Decoding: One Write-Head is All You Need", arXiv:1911.02150). RoPE keys are cached
after rotation by default; a model built with ``cache_rotated_keys=False`` caches them before
rotation instead and rotates every cached key at each step with the frequencies of that step
(``keys_rotated`` records which, see :class:`pebook.TinyLM`). A model with a ``sliding_window``
``W`` keeps only the last ``W`` tokens (``dropped`` counts the tokens no longer held; Mistral
7B, Jiang et al. 2023, arXiv:2310.06825). The positions of the cached tokens are kept too (one
``(batch, length)`` int64 tensor), because logit-bias and Shaw encodings need the key positions
at every step, and a pre-rotation cache rotates its keys at them. A cache of
a left-padded batch also keeps which cached tokens are padding (``mask``, ``(batch, length)``
bool, the ``attention_mask`` of ``transformers``), so that no later step attends to them.
"""

from __future__ import annotations

import torch

from ._checks import check_float_tensor, check_int_tensor, same_device

__all__ = ["KVCache", "check_cache", "extend_key_mask", "window_cache"]


class KVCache:
    """Per-layer ``(keys, values)``, each ``(batch, n_kv_heads, length, head_dim)``, and ``positions``.

    Behaves as a sequence of ``(k, v)`` pairs (``len(cache)`` is the number of layers,
    ``cache[i]`` layer ``i``'s pair). A model returns a new cache at every step; caches are not
    modified in place. ``mask``: ``None`` (no padding) or ``(batch, length)`` bool, False for
    the padding tokens of a left-padded batch. ``keys_rotated``: the keys are stored after the
    encoding's ``"qk"`` transform (the default; for other encodings the transform is the
    identity), ``False`` for a pre-rotation cache. ``dropped``: how many earlier tokens a
    sliding window has evicted (0 for a full cache), so the cache holds tokens ``dropped …
    dropped + length - 1`` of the sequence (in storage order).
    """

    __slots__ = ("layers", "positions", "mask", "keys_rotated", "dropped")

    def __init__(
        self,
        layers,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        keys_rotated: bool = True,
        dropped: int = 0,
    ):
        self.layers = tuple(layers)
        self.positions = positions
        self.mask = mask
        self.keys_rotated = keys_rotated
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int):
        return self.layers[layer]

    def __iter__(self):
        return iter(self.layers)

    @property
    def length(self) -> int:
        """Number of cached tokens."""
        return self.positions.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys and values (the positions and the padding mask are not counted)."""
        return sum(t.numel() * t.element_size() for kv in self.layers for t in kv)

    def __repr__(self) -> str:
        if not self.layers:
            return "KVCache(layers=0)"
        return f"KVCache(layers={len(self.layers)}, keys={tuple(self.layers[0][0].shape)}, length={self.length})"

    def check(
        self,
        *,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        batch: int | None,
        device,
        dtype,
        keys_rotated: bool | None = None,
    ) -> int:
        """Check that this cache fits a model of this shape; return its length.

        Checked once per step, by the public entry point: the number of layers, heads and head
        size (a cache made by a model of another shape raises ``ValueError`` saying so), the
        batch size (when given), equal lengths, the device and the dtype, and, when
        ``keys_rotated`` is given, that the keys were cached before or after rotation as the
        model caches them.
        """
        if keys_rotated is not None and self.keys_rotated != keys_rotated:
            held, wanted = ("rotated", "before") if self.keys_rotated else ("unrotated", "after")
            raise ValueError(
                f"past_kvs holds {held} keys but this model caches keys {wanted} rotation "
                f"(cache_rotated_keys={keys_rotated}): the cache was made by another model"
            )
        if isinstance(self.dropped, bool) or not isinstance(self.dropped, int) or self.dropped < 0:
            raise ValueError(f"past_kvs.dropped must be an int >= 0 (tokens evicted), got {self.dropped!r}")
        if len(self.layers) != n_layers:
            raise ValueError(
                f"past_kvs holds {len(self.layers)} layers but this model has n_layers={n_layers}: "
                "the cache was made by another model"
            )
        check_int_tensor("past_kvs.positions", self.positions, ndim=2)
        length = self.positions.shape[1]
        if not same_device(self.positions.device, device):
            raise ValueError(f"past_kvs.positions is on {self.positions.device} but the model is on {device}")
        for layer, kv in enumerate(self.layers):
            if not (isinstance(kv, (tuple, list)) and len(kv) == 2):
                raise TypeError(f"past_kvs[{layer}] must be a (k, v) pair, got {type(kv).__name__}")
            for part, tensor in zip(("k", "v"), kv):
                name = f"past_kvs[{layer}].{part}"
                check_float_tensor(name, tensor, ndim=4)
                b, h, n, d = tensor.shape
                if (h, d) != (n_kv_heads, head_dim):
                    raise ValueError(
                        f"{name} has shape {tuple(tensor.shape)} but this model caches "
                        f"(batch, n_kv_heads={n_kv_heads}, positions, head_dim={head_dim}): "
                        "the cache was made by a model of another shape"
                    )
                if batch is not None and b != batch:
                    raise ValueError(f"{name} holds batch size {b} but the new tokens have batch size {batch}")
                if n != length:
                    raise ValueError(f"{name} holds {n} positions but the cache's positions hold {length}")
                if not same_device(tensor.device, device):
                    raise ValueError(f"{name} is on {tensor.device} but the model is on {device}")
                if tensor.dtype != dtype:
                    raise TypeError(f"{name} has dtype {tensor.dtype} but the model computes in {dtype}")
        if batch is not None and self.positions.shape[0] != batch:
            raise ValueError(
                f"past_kvs.positions has shape {tuple(self.positions.shape)} but the new tokens have batch size {batch}"
            )
        if self.mask is not None:
            if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool:
                raise TypeError(f"past_kvs.mask must be None or a bool tensor, got {_describe(self.mask)}")
            if self.mask.shape != self.positions.shape:
                raise ValueError(
                    f"past_kvs.mask has shape {tuple(self.mask.shape)} but the cache's positions have shape "
                    f"{tuple(self.positions.shape)}: one entry per cached token"
                )
            if not same_device(self.mask.device, device):
                raise ValueError(f"past_kvs.mask is on {self.mask.device} but the model is on {device}")
        return length


def _describe(value) -> str:
    return f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def extend_key_mask(mask: torch.Tensor | None, new: int) -> torch.Tensor | None:
    """The key mask after ``new`` real tokens follow a cache whose mask is ``mask`` (``None`` stays ``None``)."""
    if mask is None:
        return None
    return torch.cat((mask, mask.new_ones(mask.shape[0], new)), dim=1)


def check_cache(name: str, cache, **shape) -> int:
    """Check that ``cache`` (the argument ``name``) is a :class:`KVCache` fitting ``shape``; return its length.

    ``shape``: the keyword arguments of :meth:`KVCache.check`.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"{name} must be the KVCache returned with return_kv=True, got {type(cache).__name__}")
    return cache.check(**shape)


def window_cache(layers, positions, mask, window: int | None, *, keys_rotated: bool, dropped: int) -> KVCache:
    """The :class:`KVCache` of ``layers`` after a step, keeping only the last ``window`` tokens.

    ``window=None`` keeps everything. ``dropped``: the tokens evicted before this step; the
    result's ``dropped`` adds those evicted now (Mistral's rolling buffer, Jiang et al. 2023,
    arXiv:2310.06825, §2: "the cache has a fixed size of W").
    """
    length = positions.shape[1]
    if window is not None and length > window:
        cut = length - window
        layers = [(k[:, :, cut:], v[:, :, cut:]) for k, v in layers]
        positions = positions[:, cut:]
        mask = None if mask is None else mask[:, cut:]
        dropped += cut
    return KVCache(layers, positions, mask, keys_rotated=keys_rotated, dropped=dropped)
