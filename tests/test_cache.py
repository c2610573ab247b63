"""pebook.cache: the KV cache (Shazeer 2019, arXiv:1911.02150): per layer ``(k, v)`` of shape
``(batch, n_kv_heads, length, head_dim)`` and the ``(batch, length)`` positions of the cached tokens.

The reference for the byte count is the definition: keys and values, ``2 · layers · batch ·
n_kv_heads · length · head_dim`` elements of the cache's dtype; positions are not counted.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
from pebook import KVCache

SHAPE = dict(n_layers=2, n_kv_heads=3, head_dim=4, batch=2)


def make(n_layers=2, batch=2, n_kv_heads=3, length=5, head_dim=4, *, device="cpu", dtype=torch.float32):
    layers = [
        tuple(
            torch.full((batch, n_kv_heads, length, head_dim), 10.0 * layer + part, device=device, dtype=dtype)
            for part in (0, 1)
        )
        for layer in range(n_layers)
    ]
    positions = torch.arange(length, device=device).expand(batch, length)
    return KVCache(layers, positions)


def check(cache, device="cpu", dtype=torch.float32, **overrides):
    device = torch.empty(0, device=device).device  # indexed (cuda:0), as the model's weights report it
    return cache.check(**(SHAPE | {"device": device, "dtype": dtype} | overrides))


# ---------------------------------------------------------------- the sequence protocol


def test_cache_is_a_sequence_of_layer_pairs(device):
    cache = make(device=device)
    assert len(cache) == 2 and isinstance(cache.layers, tuple)
    for layer, (k, v) in enumerate(cache):
        assert cache[layer][0] is k and cache[layer][1] is v
        assert k.shape == v.shape == (2, 3, 5, 4)
        assert torch.equal(k, torch.full_like(k, 10.0 * layer)) and torch.equal(v, torch.full_like(v, 10.0 * layer + 1))
    assert cache[-1] is cache.layers[1]
    with pytest.raises(IndexError):
        cache[2]
    assert cache.length == 5 and check(cache, device) == 5


@given(
    n_layers=st.integers(1, 4),
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    length=st.integers(0, 9),
    head_dim=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
)
def test_nbytes_counts_keys_and_values_only(n_layers, batch, heads, length, head_dim, dtype):
    cache = make(n_layers, batch, heads, length, head_dim, dtype=dtype)
    itemsize = torch.finfo(dtype).bits // 8
    assert cache.nbytes == 2 * n_layers * batch * heads * length * head_dim * itemsize
    assert cache.length == length


def test_snapshot_nbytes_and_repr():
    """2 layers × (k, v) × batch 2 × 3 heads × 5 tokens × head_dim 4 × 4 bytes = 1920."""
    cache = make()
    assert cache.nbytes == 1920
    assert repr(cache) == "KVCache(layers=2, keys=(2, 3, 5, 4), length=5)"
    assert repr(KVCache([], torch.zeros(1, 0, dtype=torch.long))) == "KVCache(layers=0)"


def test_a_model_returns_a_new_cache_and_leaves_the_old_one_alone():
    """Caches are values: a decoding step returns a longer cache, the one passed in is unchanged."""
    torch.manual_seed(0)
    model = pebook.TinyLM(20, 16, 2, 4, 16, encoding="rope", n_kv_heads=2)
    tokens = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model(tokens[:, :4], return_kv=True)
        before = [tuple(t.clone() for t in kv) for kv in cache]
        _, longer = model(tokens[:, 4:], past_kvs=cache, return_kv=True)
    assert isinstance(cache, KVCache) and len(cache) == 2 and cache.length == 4 and longer.length == 6
    assert cache.layers[0][0].shape == (3, 2, 4, 4)  # (batch, n_kv_heads, length, head_dim)
    assert cache.nbytes == 2 * 2 * 3 * 2 * 4 * 4 * 4
    assert all(torch.equal(a, b) for kv, old in zip(cache, before, strict=True) for a, b in zip(kv, old, strict=True))
    assert longer.positions.tolist() == [list(range(6))] * 3
    for (k_old, _), (k_new, _) in zip(cache, longer, strict=True):
        assert torch.equal(k_new[:, :, :4], k_old)  # the old keys are a prefix of the new ones


# ---------------------------------------------------------------- check()


def test_check_returns_the_length_and_skips_the_batch_when_not_given(device):
    cache = make(device=device)
    assert check(cache, device, batch=None) == 5
    assert check(make(length=0, device=device), device) == 0


@pytest.mark.parametrize(
    "overrides,error,pattern",
    [
        (
            dict(n_layers=3),
            ValueError,
            r"past_kvs holds 2 layers but this model has n_layers=3: the cache was made by another model",
        ),
        (
            dict(n_kv_heads=4),
            ValueError,
            r"past_kvs\[0\]\.k has shape \(2, 3, 5, 4\) but this model caches "
            r"\(batch, n_kv_heads=4, positions, head_dim=4\)",
        ),
        (
            dict(head_dim=8),
            ValueError,
            r"past_kvs\[0\]\.k has shape \(2, 3, 5, 4\) but .*head_dim=8\): "
            r"the cache was made by a model of another shape$",
        ),
        (dict(batch=1), ValueError, r"past_kvs\[0\]\.k holds batch size 2 but the new tokens have batch size 1$"),
        (
            dict(dtype=torch.float16),
            TypeError,
            r"past_kvs\[0\]\.k has dtype torch.float32 but the model computes in torch.float16$",
        ),
    ],
)
def test_check_rejects_a_cache_of_another_model(device, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        check(make(device=device), device, **overrides)


def test_check_rejects_inconsistent_caches(device):
    cache = make(device=device)
    k, v = cache[1]
    shorter = KVCache([cache[0], (k, v[:, :, :4])], cache.positions)
    with pytest.raises(ValueError, match=r"past_kvs\[1\]\.v holds 4 positions but the cache's positions hold 5$"):
        check(shorter, device)
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k holds 5 positions but the cache's positions hold 6$"):
        check(KVCache(cache.layers, torch.arange(6, device=device).expand(2, 6)), device)
    with pytest.raises(TypeError, match=r"past_kvs\[1\] must be a \(k, v\) pair, got Tensor$"):
        check(KVCache([cache[0], k], cache.positions), device)
    with pytest.raises(TypeError, match=r"past_kvs\[0\] must be a \(k, v\) pair, got tuple$"):
        check(KVCache([(k, v, v), cache[1]], cache.positions), device)
    with pytest.raises(TypeError, match=r"past_kvs\[0\]\.v must be a floating-point tensor, got dtype torch.int64$"):
        check(KVCache([(k, v.long()), cache[1]], cache.positions), device)
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k must have 4 dimensions, got shape \(3, 5, 4\)$"):
        check(KVCache([(k[0], v), cache[1]], cache.positions), device)


def test_check_rejects_bad_positions(device):
    cache = make(device=device)
    with pytest.raises(TypeError, match=r"past_kvs.positions must be an integer tensor, got dtype torch.float32$"):
        check(KVCache(cache.layers, cache.positions.float()), device)
    with pytest.raises(ValueError, match=r"past_kvs.positions must have 2 dimensions, got shape \(5,\)$"):
        check(KVCache(cache.layers, cache.positions[0]), device)
    with pytest.raises(
        ValueError, match=r"past_kvs.positions has shape \(1, 5\) but the new tokens have batch size 2$"
    ):
        check(KVCache(cache.layers, cache.positions[:1]), device)
    assert check(KVCache(cache.layers, cache.positions[:1]), device, batch=None) == 5


@pytest.mark.cuda
def test_check_rejects_a_cache_on_another_device(cuda_device):
    with pytest.raises(ValueError, match=r"past_kvs.positions is on cpu but the model is on cuda"):
        check(make(), cuda_device)
    cache = make()
    on_gpu = KVCache(cache.layers, cache.positions.to(cuda_device))
    with pytest.raises(ValueError, match=r"past_kvs\[0\]\.k is on cpu but the model is on cuda"):
        check(on_gpu, cuda_device)
