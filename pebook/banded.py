"""Attention whose positional term is a band plus a far constant.

Some logit biases depend on the distance ``δ = q_pos - k_pos`` only near the diagonal: past a
distance ``W`` they are one constant per head and direction. T5's bucketed bias is the case in
point (Raffel et al. 2020, arXiv:1910.10683, §2.1): every ``|δ| >= max_distance`` falls in the
last bucket of its direction (``transformers``' ``T5Attention._relative_position_bucket``), so

    bias_h(δ) = b_h(δ)  for -W < δ < W (only 0 <= δ < W when causal),
                c⁺_h    for δ >= W (keys far behind),   c⁻_h  for δ <= -W (far ahead, not causal).

Over the far keys the attention is then plain softmax attention whose log-sum-exp is shifted by
the constant: ``log Σ_far exp(s_ij + c) = c + LSE_far``. One fused kernel computes it with its
log-sum-exp (the CPU flash kernel, as in :mod:`pebook.shaw`'s fast path). The band runs on the
same kernel: a block of ``T`` queries sees a window of ``T + n - 1`` keys (``n = 2W - 1``
offsets, ``W`` causal) through an additive ``(heads, T, T + n - 1)`` mask that is the same for
every block (Toeplitz: it holds ``b_h`` on the band, ``-inf`` off it), so all inner blocks are
one batched call over strided views of ``q, k, v`` (no copy), and the few blocks at the ends of
the keys run on the keys that exist. The parts are merged by their log-sum-exps (the split-key
softmax of FlashAttention, Dao et al. 2022, arXiv:2205.14135, §3.1). Extra memory ``O(L)`` per
head (the outputs and log-sum-exps of the parts) plus the ``O(W²)`` mask, no ``(L, L)``
tensor; exact up to float rounding.

The degenerate case of a bias with no far constant but linear in the distance, causal ALiBi
(Press et al. 2022, arXiv:2108.12409, §3), also runs on the fused kernel: one extra query and key
feature carry it (the section "a bias linear in the distance" below).

An encoding opts in by returning ``W`` from :meth:`pebook.LogitBias.constant_beyond`, or its slopes
from :meth:`pebook.LogitBias.linear_slopes` (``None``: neither). :func:`banded_logit_bias_attention`
is the ``attn_implementation="flex_attention"`` path of such an encoding where it applies
(:func:`banded_refusal`); elsewhere the caller's path runs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .shaw import _MIN_BLOCK, _expand_kv, _part_order

__all__ = ["banded_refusal", "banded_width", "banded_logit_bias_attention"]

_FAST_DTYPES = (torch.float32, torch.float64)
#: band masks kept (per dtype, device, band bias and geometry), most recent last
_MASK_CACHE_SIZE = 4
_MASKS: OrderedDict = OrderedDict()
#: queries per block of the linear (ALiBi) path at most and at least, and the largest slope · block / 2
#: it accepts: the added logit term m·(j - c) of the keys that matter stays within this of zero
_LINEAR_BLOCK = 256
_LINEAR_MIN_BLOCK = 16
_LINEAR_MAX_TERM = 64.0


def _linear_block(slopes) -> int:
    """Queries per block: at most ``_LINEAR_BLOCK``, with ``max(m) · block / 2 <= _LINEAR_MAX_TERM``."""
    largest = float(slopes.max())
    return _LINEAR_BLOCK if largest <= 0 else min(_LINEAR_BLOCK, int(2 * _LINEAR_MAX_TERM / largest))


def banded_width(encoding) -> int | None:
    """The band ``W`` of ``encoding``: the least distance from which its key is constant in each
    direction (at most :meth:`~pebook.LogitBias.constant_beyond`), or ``None`` if it is not banded."""
    limit = encoding.constant_beyond()
    if limit is None:
        return None
    distances = torch.arange(-limit, limit + 1)
    keys = encoding.distance_key(distances)
    behind, ahead = keys[limit:], keys[: limit + 1].flip(0)  # δ = 0 … limit and δ = 0 … -limit
    width = 1
    for side in (behind, ahead):
        differs = (side != side[-1]).nonzero()
        width = max(width, int(differs[-1]) + 1 if len(differs) else 1)
    return width


def _kind(encoding) -> str | None:
    """``"band"`` (:meth:`~pebook.LogitBias.constant_beyond`), ``"linear"``
    (:meth:`~pebook.LogitBias.linear_slopes`) or ``None``."""
    if getattr(encoding, "constant_beyond", lambda: None)() is not None:
        return "band"
    if getattr(encoding, "linear_slopes", lambda: None)() is not None:
        return "linear"
    return None


def banded_refusal(
    q, k, encoding, q_pos, k_pos, *, causal=True, key_mask=None, window=None, needs_grad=False
) -> str | None:
    """Why the banded path cannot compute this attention (the caller's path then does), or ``None``."""
    kind = _kind(encoding)
    if kind is None:
        return f"the {type(encoding).__name__} bias is neither constant beyond a distance nor linear in it"
    if kind == "linear":
        if not causal:
            return "a linear bias without the causal mask (the keys ahead would dominate)"
        slopes = encoding.linear_slopes()
        if bool((slopes < 0).any()) or _linear_block(slopes) < _LINEAR_MIN_BLOCK:
            largest = 2 * _LINEAR_MAX_TERM / _LINEAR_MIN_BLOCK
            return f"slopes outside [0, {largest}] (the float32 error bound), got {slopes.tolist()}"
    if q.device.type not in _FUSED:
        return f"no fused attention with a log-sum-exp on {q.device.type}"
    if q.dtype not in _FAST_DTYPES:
        return f"dtype {q.dtype} (the banded path takes {', '.join(map(str, _FAST_DTYPES))})"
    if needs_grad:
        return "a gradient is needed (the banded path has no backward)"
    lq, lk = q.shape[2], k.shape[2]
    if lq < 2 or lq > lk:
        return "a single query (decoding), no queries, or more queries than keys"
    if key_mask is not None:
        return "padding keys (key_mask)"
    if window is not None and lk > window:
        return "a sliding window"
    consecutive = bool((k_pos[:, 1:] - k_pos[:, :-1] == 1).all()) and torch.equal(q_pos, k_pos[:, lk - lq :])
    if not consecutive:
        return "positions that are not consecutive in storage order (the queries the last keys)"
    return None


def _keys(encoding, causal: bool, device):
    """``(width, keys)``: the parameter-free :meth:`~pebook.LogitBias.distance_key` of the band
    columns (column ``w`` at distance ``width - 1 - w``), then of the far distances ``width`` (and
    ``-width`` when not causal); cached on the encoding per (limit, causal, device)."""
    limit = encoding.constant_beyond()
    cache = encoding.__dict__.setdefault("_banded_keys", {})
    key = (limit, causal, torch.device(device))
    if key not in cache:
        width = banded_width(encoding)
        n_columns = width if causal else 2 * width - 1
        distances = torch.arange(width - 1, width - 1 - n_columns, -1)
        far = torch.tensor([width] if causal else [width, -width])
        cache[key] = (width, encoding.distance_key(torch.cat([distances, far])).to(device))
    return cache[key]


def _biases(encoding, causal: bool, dtype, device):
    """``(width, band (heads, n_columns), far (heads, 1 or 2))``: the bias of each band column and the far constants."""
    encoding.prepare_()
    width, keys = _keys(encoding, causal, device)
    heads = torch.arange(encoding.n_heads, device=device)[:, None]
    bias = encoding.key_score(heads, keys[None, :]).to(dtype)
    n_far = 1 if causal else 2
    return width, bias[:, :-n_far], bias[:, -n_far:]


def _prefix_attention_cpu(q, k, v, scale, shift):
    """``(out, logsumexp)`` of softmax attention where query ``t`` sees keys ``j <= t + shift``, with
    ``k_len = q_len + shift``: the first ``shift`` keys (seen by all) and a causal square, merged by
    log-sum-exp, so that no ``(q_len, k_len)`` mask is built."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    square = flash(q, k[:, :, shift:], v[:, :, shift:], 0.0, True, scale=scale)[:2]
    if shift == 0:
        return square
    past = flash(q, k[:, :, :shift], v[:, :, :shift], 0.0, False, scale=scale)[:2]
    lse = torch.logaddexp(past[1], square[1])
    out = torch.exp(past[1] - lse)[..., None] * past[0] + torch.exp(square[1] - lse)[..., None] * square[0]
    return out, lse


def _far_parts(q, k, v, width, causal):
    """The far keys as prefix attentions: ``(side, rows, flip, shift, queries, keys, values)``.

    Side 0, behind (``δ >= width``): query ``t`` of ``q[rows]`` sees keys ``j <= t + shift`` of
    ``k[:k_len - width]``. Side 1, ahead (``δ <= -width``, not causal): the same on the reversed
    sequences. Queries are the last ``q_len`` of the keys.
    """
    lq, lk = q.shape[2], k.shape[2]
    before = lk - lq  # keys stored before the first query
    parts = []
    if lk <= width:
        return parts
    first = max(0, width - before)  # first query with a key `width` or more behind it
    if first < lq:
        keys = slice(0, lk - width)
        parts.append(
            (0, slice(first, lq), False, before + first - width, q[:, :, first:], k[:, :, keys], v[:, :, keys])
        )
    if not causal and lq > width:  # queries 0 … lq - width - 1 have keys `width` or more ahead
        rows, keys = slice(0, lq - width), slice(before + width, lk)
        flipped = (_part_order(x[:, :, index], True) for x, index in ((q, rows), (k, keys), (v, keys)))
        parts.append((1, rows, True, 0, *flipped))
    return parts


def _band_mask(band_bias, block):
    """Additive ``(1, heads, block, span)`` mask of a block of queries over its key window: window
    column ``u`` of query ``t`` is band column ``u - t`` (its bias), ``-inf`` off the band. Cached for
    the last few band biases (compared by value)."""
    key = (band_bias.dtype, band_bias.device, tuple(band_bias.shape), block)
    entry = _MASKS.get(key)
    if entry is None or not torch.equal(entry[0], band_bias):
        n_columns = band_bias.shape[1]
        column = torch.arange(block + n_columns - 1, device=band_bias.device)
        column = column - torch.arange(block, device=band_bias.device)[:, None]
        on_band = (column >= 0) & (column < n_columns)
        mask = band_bias[:, column.clamp(0, n_columns - 1)].masked_fill(~on_band, float("-inf"))[None]
        entry = (band_bias.clone(), mask)
        _MASKS[key] = entry
        while len(_MASKS) > _MASK_CACHE_SIZE:
            _MASKS.popitem(last=False)
    _MASKS.move_to_end(key)
    return entry[1]


def _blocks_view(x, batch, first_row, n_blocks, block, rows):
    """``(n_blocks, heads, rows, d)`` overlapping view of ``x[batch]``: block ``n`` holds rows
    ``first_row + n·block …`` (no copy: the fused kernel reads strided inputs)."""
    sb, sh, sl, sd = x.stride()
    offset = x.storage_offset() + batch * sb + first_row * sl
    return x.as_strided((n_blocks, x.shape[1], rows, x.shape[3]), (block * sl, sh, sl, sd), offset)


def _band_attention_cpu(q, k, v, band_bias, first, scale):
    """``(out, logsumexp)`` over the band: query ``i`` sees keys ``first + i + w`` (those that exist)
    with the bias ``band_bias[:, w]``, ``0 <= w < n_columns``.

    Blocks of ``block`` queries whose key window of ``span = block + n_columns - 1`` keys lies
    inside the keys run as one fused attention per batch row, the blocks a batch and the windows
    strided views, with one shared mask; the blocks at the ends run one by one over the keys
    that exist."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, h, lq, d = q.shape
    lk = k.shape[2]
    n_columns = band_bias.shape[1]
    block = min(lq, max(_MIN_BLOCK, n_columns))
    span = block + n_columns - 1
    mask = _band_mask(band_bias, block)
    n_blocks = -(-lq // block)
    inner_first = min(n_blocks, max(0, -(first // block)))  # first block whose window starts at key 0 or later
    inner_stop = max(inner_first, min(lq // block, (lk - span - first) // block + 1))

    def edge(n):
        rows = slice(n * block, min(lq, (n + 1) * block))
        start = first + rows.start
        c0, c1 = max(0, -start), min(span, lk - start)
        keys = slice(start + c0, start + c1)
        window_mask = mask[:, :, : rows.stop - rows.start, c0:c1]
        return flash(q[:, :, rows], k[:, :, keys], v[:, :, keys], 0.0, False, attn_mask=window_mask, scale=scale)[:2]

    before = [edge(n) for n in range(inner_first)]
    after = [edge(n) for n in range(inner_stop, n_blocks)]
    inner_out, inner_lse = [], []
    n_inner = inner_stop - inner_first
    for row in range(b if n_inner else 0):
        views = [
            _blocks_view(x, row, inner_first * block + shift, n_inner, block, rows)
            for x, shift, rows in ((q, 0, block), (k, first, span), (v, first, span))
        ]
        out, lse = flash(*views, 0.0, False, attn_mask=mask, scale=scale)[:2]
        inner_out.append(out.transpose(0, 1).reshape(h, n_inner * block, d))
        inner_lse.append(lse.transpose(0, 1).reshape(h, n_inner * block))
    parts = [*before, *([(torch.stack(inner_out), torch.stack(inner_lse))] if n_inner else []), *after]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)


#: device type -> fused (band attention, prefix attention), each returning its log-sum-exp
_FUSED = {"cpu": (_band_attention_cpu, _prefix_attention_cpu)}


def banded_logit_bias_attention(q, k, v, encoding, *, causal: bool, scale) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias) v`` for a banded ``encoding`` (module docstring), without gradients.

    ``q`` ``(batch, heads, q_len, d)``, ``k``, ``v`` ``(batch, kv_heads, k_len, d)`` with
    ``kv_heads`` dividing ``heads``; the queries are the last ``q_len`` keys, at consecutive
    positions (:func:`banded_refusal` is ``None``); ``scale`` ``None`` for ``1/√d``.
    """
    kind = _kind(encoding)
    if kind is None:
        raise ValueError(
            f"encoding must be a logit bias that is constant beyond a distance (constant_beyond() not None) "
            f"or linear in it (linear_slopes() not None), got {type(encoding).__name__}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kind == "linear":
        return _linear_attention(q, k, v, encoding.linear_slopes(), scale)
    k, v = _expand_kv(q, k, v)
    band_attention, prefix_attention = _FUSED[q.device.type]
    lq, lk = q.shape[2], k.shape[2]
    width, band_bias, far_bias = _biases(encoding, causal, q.dtype, q.device)
    out, lse = band_attention(q, k, v, band_bias, lk - lq + 1 - width, scale)  # column 0: distance width - 1
    parts = _far_parts(q, k, v, width, causal)
    for n, (side, rows, flip, shift, qs, ks, vs) in enumerate(parts):
        out_far, lse_far = prefix_attention(qs, ks, vs, scale, shift)
        out_far, lse_far = _part_order(out_far, flip), _part_order(lse_far, flip) + far_bias[None, :, side, None]
        # out = (e^lse out + e^lse_far out_far) / (e^lse + e^lse_far), a lerp by σ(lse_far - lse)
        out[:, :, rows].lerp_(out_far, torch.sigmoid(lse_far - lse[:, :, rows])[..., None])
        if n + 1 < len(parts):
            lse[:, :, rows] = torch.logaddexp(lse[:, :, rows], lse_far)
    return out


# -- a bias linear in the distance (causal ALiBi, Press et al. 2022, arXiv:2108.12409, §3) -------
#
# softmax_j(s_ij - m (i - j)) = softmax_j(s_ij + m (j - c)) for any row constant c, and m (j - c) is
# the product of one extra query feature m / scale and one extra key feature j - c. So causal
# ALiBi is bias-free causal attention on features of size d + 1, run on the fused kernel one block
# of queries at a time with c the block's centre: for the keys whose weight is not negligible the
# added term stays within m·(block/2 + a few dozen / m) of zero, so its float32 rounding is that of
# a materialised bias of the same magnitude (the SDPA path's). Keys far behind get -m·(c - j),
# whose exp underflows to 0 exactly when the true weight is below float32 resolution.


def _linear_attention(q, k, v, slopes, scale):
    """Causal ``softmax(q kᵀ · scale - m_h (i - j)) v`` (queries the last keys) by the extra feature."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    k, v = _expand_kv(q, k, v)
    m = slopes.to(q.dtype).view(1, h, 1, 1)
    queries = torch.cat([q, (m / scale).expand(b, h, lq, 1)], dim=-1)
    keys = torch.nn.functional.pad(k, (0, 1))  # the last feature, j - c, is written per block
    values = torch.nn.functional.pad(v, (0, 1))  # the kernel wants one head size: a zero feature
    position = torch.arange(lk, device=q.device, dtype=q.dtype)
    out = q.new_empty(b, h, lq, d)
    before = lk - lq
    step = _linear_block(slopes)
    for start in range(0, lq, step):
        stop = min(lq, start + step)
        n_keys = before + stop
        keys[:, :, :n_keys, d] = position[:n_keys] - (before + (start + stop - 1) / 2)
        block, _ = _prefix_attention_cpu(
            queries[:, :, start:stop], keys[:, :, :n_keys], values[:, :, :n_keys], scale, before + start
        )
        out[:, :, start:stop] = block[..., :d]
    return out
