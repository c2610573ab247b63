"""Shared fixtures and the float64 paper references for pebook's test suite.

Everything in the "references" section below is written from the papers' equations (or, where
a paper defers to code, from the published reference code, quoted) and never calls pebook.
The generic layer references after it (``ref.positional_attention``, ``ref.mha``, ``ref.block``,
``ref.tiny_lm``) know no encoding by name: they write out the layers' plumbing in float64 and
take from the encoding module only what its declared ``place`` contributes. Tests reach all of
them through the ``ref`` fixture, so each reference exists once.

Encodings come from the registry (``pebook.ENCODINGS``): the ``encoding_name`` fixture and
``example_options(name)`` give every registered encoding with small valid options, so a new
encoding is tested by every generic test without editing them.

Devices: the ``device`` fixture runs a test on ``cpu`` and on ``cuda``; the ``cuda`` variant is
marked ``cuda`` (declared in pyproject.toml) and skipped when no GPU is present. TF32 is turned
off so that float32 matmuls on CUDA are IEEE float32 and the stated float32 tolerances hold.

Hypothesis: profile ``pebook`` (the default: few examples, derandomized so CI is reproducible)
or ``thorough`` (``HYPOTHESIS_PROFILE=thorough``: more examples, random seeds).
"""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # in this process only: nbval kernels keep their inline backend

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# IEEE float32 on CUDA (no TF32), so float32 tolerances below mean the same on every device.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# Every tensor in this suite is tiny: intra-op threads only add synchronisation, and on a busy
# 2-core machine OpenMP spin-waiting made the suite 5x slower. One thread unless the caller
# chose otherwise with OMP_NUM_THREADS.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# The `device` fixture is function scoped but immutable (a torch.device), so reusing it across
# hypothesis examples is safe.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], print_blob=True)
settings.register_profile("pebook", max_examples=20, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pebook"))


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """Every tensor-producing test runs once per device; cuda is skipped without a GPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(request.param)


# --------------------------------------------------------------------------------------------
# encodings: every test that iterates over encodings reads the registry, never a list of names
# --------------------------------------------------------------------------------------------


from registry_cases import BIAS_ENCODINGS, ENCODING_NAMES, example_options, layer_options, model_options  # noqa: E402,F401


@pytest.fixture(params=ENCODING_NAMES)
def encoding_name(request) -> str:
    """Each registered encoding, by name."""
    return request.param


@pytest.fixture(params=BIAS_ENCODINGS)
def bias_encoding_name(request) -> str:
    """Each registered logit-bias encoding (a :class:`pebook.LogitBias`), by name."""
    return request.param


@pytest.fixture
def cuda_device() -> torch.device:
    """A CUDA device for device-mismatch tests (they need two devices); skipped without a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device("cuda")


# Tolerance for float32 results compared with a float64 reference: a few float32 roundings of
# O(1) quantities accumulated over sums of at most a few hundred terms. (float64 comparisons state
# their tolerance where they are made, 1e-12 or tighter unless a comment says why: pebook makes
# no algorithmic approximation, so float64 differences are rounding only.)
F32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def tol32(device) -> dict:
    """float32-vs-float64 tolerance; CUDA reductions are ordered differently, so a bit looser."""
    return F32 if device.type == "cpu" else dict(rtol=5e-5, atol=5e-5)


def randn(*shape, seed: int, device, dtype=torch.float64) -> torch.Tensor:
    """Seeded N(0, 1) drawn on the CPU in float64, then moved: identical values on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.fixture
def rand():
    """``rand(*shape, seed=, device=, dtype=float64)``: seeded normal tensor (see :func:`randn`)."""
    return randn


# --------------------------------------------------------------------------------------------
# references, float64, written from the papers; none of them calls pebook
# --------------------------------------------------------------------------------------------


def sinusoidal_table_ref(n_positions: int, dim: int, base: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """Vaswani et al. 2017, §3.5, element by element in Python floats:
    PE(p, 2i) = sin(p / base^(2i/d)),  PE(p, 2i+1) = cos(p / base^(2i/d))."""
    rows = []
    for p in range(offset, offset + n_positions):
        row = []
        for c in range(dim):
            i = c // 2
            angle = p / base ** (2 * i / dim)
            row.append(math.sin(angle) if c % 2 == 0 else math.cos(angle))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(n_positions, dim)


def frequencies_ref(dim: int, base: float = 10000.0) -> torch.Tensor:
    """θ_i = base^(-2i/d), i = 0 … d/2-1 (Vaswani §3.5; RoFormer eq. 15), in Python floats."""
    return torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


def relative_index_ref(q_len: int, k_len: int, max_distance: int, offset: int = 0) -> torch.Tensor:
    """Shaw et al. 2018, eqs. (5)-(6): row clip(j - i, -k, k) + k, query i at offset + i, by loops."""
    out = torch.empty(q_len, k_len, dtype=torch.long)
    for i in range(q_len):
        for j in range(k_len):
            rel = j - (offset + i)
            out[i, j] = max(-max_distance, min(max_distance, rel)) + max_distance
    return out


def causal_mask_ref(q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
    """True where key j is visible to the query at absolute position offset + i (j <= offset + i)."""
    return torch.tensor([[j <= offset + i for j in range(k_len)] for i in range(q_len)], dtype=torch.bool).reshape(
        q_len, k_len
    )


def shaw_ref(q, k, v, rel_k, rel_v, max_distance: int, causal: bool = True, offset: int | None = None):
    """Shaw, Uszkoreit & Vaswani 2018, eqs. (3)-(6), materialising a^K, a^V as (L_q, L_k, d):

        a^K_ij = w^K_clip(j-i,k),  a^V_ij = w^V_clip(j-i,k)        (5), (6)
        e_ij = q_i · (k_j + a^K_ij) / sqrt(d)                      (4)
        z_i = Σ_j softmax_j(e)_ij (v_j + a^V_ij)                   (3)

    Differentiable (torch ops only), so its autograd gradients are the reference gradients.
    """
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    offset = lk - lq if offset is None else offset
    index = relative_index_ref(lq, lk, max_distance, offset).to(q.device)
    a_k = rel_k[index]  # (lq, lk, d)
    a_v = rel_v[index]
    keys = k[..., None, :, :] + a_k  # (b, h, lq, lk, d): k_j + a^K_ij
    e = (q[..., :, None, :] * keys).sum(-1) / math.sqrt(d)  # eq. (4)
    if causal:
        e = e.masked_fill(~causal_mask_ref(lq, lk, offset).to(q.device), float("-inf"))
    alpha = torch.softmax(e, dim=-1)
    values = v[..., None, :, :] + a_v  # v_j + a^V_ij
    return (alpha[..., None] * values).sum(-2)  # eq. (3)


def t5_bucket_ref(relative_position: torch.Tensor, bidirectional=True, num_buckets=32, max_distance=128):
    """``T5Attention._relative_position_bucket`` of Hugging Face transformers (modeling_t5.py),
    itself a port of Mesh TensorFlow's ``_relative_position_bucket``; quoted verbatim apart from
    names. ``relative_position`` is ``memory_position - context_position`` = j - i. Note the
    float32 log, as in both published implementations: bucket edges depend on it."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    # now relative_position is in the range [0, inf)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def rope_pairs(dim: int, layout: str) -> list[tuple[int, int]]:
    """Feature pairs rotated together: (2i, 2i+1) for the paper's interleaved layout, (i, i + d/2)
    for GPT-NeoX / transformers' ``rotate_half`` layout."""
    if layout == "interleaved":
        return [(2 * i, 2 * i + 1) for i in range(dim // 2)]
    return [(i, i + dim // 2) for i in range(dim // 2)]


def rope_matrix_ref(m: float, theta: torch.Tensor, layout: str = "interleaved") -> torch.Tensor:
    """RoFormer eq. (15): R^d_{Θ,m}, block diagonal with blocks [[cos mθ_i, -sin mθ_i],
    [sin mθ_i, cos mθ_i]] acting on pair i (placed on the layout's feature pair)."""
    dim = 2 * theta.numel()
    R = torch.zeros(dim, dim, dtype=torch.float64)
    for i, (a, b) in enumerate(rope_pairs(dim, layout)):
        c, s = math.cos(m * float(theta[i])), math.sin(m * float(theta[i]))
        R[a, a], R[a, b], R[b, a], R[b, b] = c, -s, s, c
    return R


def rope_ref(x: torch.Tensor, positions, theta: torch.Tensor, layout: str = "interleaved") -> torch.Tensor:
    """f(x_m, m) = R^d_{Θ,m} x_m (RoFormer eq. 14), row m of x rotated by positions[m], float64."""
    mats = torch.stack([rope_matrix_ref(float(p), theta, layout) for p in positions]).to(x.device)
    return torch.einsum("mde,...me->...md", mats, x.to(torch.float64))


def rope_rotate_half_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """transformers' Llama/GPT-NeoX RoPE: emb = cat(freqs, freqs); x·cos + rotate_half(x)·sin."""
    freqs = torch.outer(positions.to(torch.float64), inv_freq.to(torch.float64))
    emb = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    rotate_half = torch.cat((-x2, x1), dim=-1)
    return x * emb.cos() + rotate_half * emb.sin()


def alibi_slopes_ref(n: int) -> list[float]:
    """``get_slopes`` from github.com/ofirpress/attention_with_linear_biases (fairseq
    models/transformer.py), verbatim."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + alibi_slopes_ref(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


def alibi_bias_ref(q_len: int, k_len: int, slopes, offset: int = 0) -> torch.Tensor:
    """Press et al. 2022, §3: bias_h(i, j) = -m_h (i - j), query i at absolute position offset + i."""
    return torch.tensor(
        [[[-float(m) * ((offset + i) - j) for j in range(k_len)] for i in range(q_len)] for m in slopes],
        dtype=torch.float64,
    ).reshape(len(slopes), q_len, k_len)


def attention_ref(q, k, v, bias=None, causal: bool = True, offset: int | None = None):
    """softmax(Q Kᵀ / sqrt(d) + bias) V (Vaswani et al. 2017, eq. 1) with an explicit causal mask
    (key j visible to query i iff j <= offset + i); ``bias`` broadcasts as ``(heads, q_len, k_len)``."""
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    offset = lk - lq if offset is None else offset
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = scores.masked_fill(~causal_mask_ref(lq, lk, offset).to(q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# --------------------------------------------------------------------------------------------
# generic float64 references of the layers: the plumbing around any encoding
# --------------------------------------------------------------------------------------------
#
# These know no encoding by name. From an encoding module they take only what its declared
# ``place`` (pebook/encoding.py) contributes, evaluated on a float64 copy of the module:
#
#   "input"      encoding.embed(position_ids)          added to the input of the layer / model
#   "qk"         encoding.rotate_queries(q, ids), encoding.rotate(k, ids)   applied to queries, keys
#   "logits"     encoding.logit_bias(q_pos, k_pos)     added to the logits
#   "key_value"  a^K_ij, a^V_ij = rows clip(j - i, ±k) + k of the module's two tables, added to
#                the keys and the values (Shaw et al. 2018, eqs. 3-6, materialised here)
#   "contextual" CoPE: gates σ(q_i·k_j/√d), positions p_ij = Σ_{t=j..i} g_it, the table
#                interpolated at p_ij added to the keys (Golovneva et al. 2024, materialised here)
#
# and write out everything else themselves: the projections, the split into heads, grouped-query
# heads, the scale, the storage-order causal mask, softmax, residuals, LayerNorm, MLP and
# unembedding. Each encoding's own hook is checked against its paper reference above in that
# encoding's test module, so the two together cover the layers end to end.


def float64_encoding(encoding):
    """A float64 copy of an encoding module (``None`` stays ``None``); the module itself is untouched."""
    return None if encoding is None else copy.deepcopy(encoding).to(torch.float64)


def _ids(ids, batch: int, default: range, device) -> torch.Tensor:
    """Position ids as ``(batch, len)`` int64: given as ``(len,)`` or ``(batch, len)``, else ``default``."""
    ids = torch.tensor(list(default)) if ids is None else ids
    ids = ids.to(device=device, dtype=torch.long)
    return ids.expand(batch, -1) if ids.dim() == 1 else ids


def positional_attention_ref(
    q, k, v, encoding=None, *, causal: bool = True, position_ids=None, key_position_ids=None, scale=None
):
    """softmax(Q Kᵀ · scale + bias) V in float64 with one encoding module's contribution (by place).

    ``q`` ``(batch, heads, q_len, d)``; ``k``, ``v`` ``(batch, kv_heads, k_len, d)``: query head
    ``j`` reads key/value head ``j // (heads / kv_heads)`` (grouped-query attention, Ainslie et
    al. 2023). Positions: ``(len,)`` or ``(batch, len)``; by default keys ``0 … k_len - 1`` and
    queries the last ``q_len`` of them. The causal mask follows storage order: query ``i`` sees
    keys ``j <= k_len - q_len + i`` whatever the positions. ``scale`` defaults to ``1/√d``.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, h, lq, d = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    q_pos = _ids(position_ids, b, range(lk - lq, lk), q.device)
    k_pos = _ids(key_position_ids, b, range(lk), q.device)
    group = torch.arange(h, device=q.device) // (h // kv_heads)
    k, v = k[:, group], v[:, group]
    enc = float64_encoding(encoding)
    place = "none" if enc is None else enc.place
    bias = a_k = a_v = None
    if place == "qk":
        q, k = enc.rotate_queries(q, q_pos), enc.rotate(k, k_pos)
    elif place == "logits":
        bias = enc.logit_bias(q_pos, k_pos)
    elif place == "key_value":
        clip = enc.max_distance
        rows = (k_pos[:, None, :] - q_pos[:, :, None]).clamp(-clip, clip) + clip  # (b, lq, lk)
        a_k, a_v = enc.rel_k[rows], enc.rel_v[rows]  # (b, lq, lk, d)
    elif place == "contextual":
        # CoPE, Golovneva et al. 2024, eqs. (3)-(6), materialising e[p_ij] as (b, h, lq, lk, d):
        # gates g_it = σ(scale · q_i·k_t) of the keys query i sees (others 0, not counted);
        # p_ij = Σ_t g_it over t with k_pos_j <= k_pos_t <= q_pos_i (default ids: t = j … i),
        # clamped at p_max; e[p] interpolated between e[⌊p⌋] and e[⌈p⌉]; logit scale · q_i·(k_j + e[p_ij]).
        s = d**-0.5 if scale is None else scale
        gates = torch.sigmoid(torch.einsum("bhid,bhjd->bhij", q, k) * s)  # eq. (3)
        if causal:
            gates = gates * causal_mask_ref(lq, lk, lk - lq).to(q.device)
        key_j, key_t = k_pos[:, None, :, None], k_pos[:, None, None, :]
        between = (key_j <= key_t) & (key_t <= q_pos[:, :, None, None])  # (b, i, j, t)
        p = torch.einsum("bhit,bijt->bhij", gates, between.double()).clamp(max=enc.max_position)  # eq. (4)
        table, below, above = enc.position_embeddings, p.floor(), p.ceil()
        e_p = (p - below)[..., None] * table[above.long()] + (1 - p + below)[..., None] * table[below.long()]  # (5)
        bias = torch.einsum("bhid,bhijd->bhij", q, e_p) * s  # scale · q_i·e[p_ij], added to scale · q_i·k_j (6)
    elif place not in ("none", "input"):  # "input" enters before the projections (mha_ref, tiny_lm_ref)
        raise ValueError(f"no reference for place {place!r}")
    scores = torch.einsum("bhid,bhjd->bhij", q, k)
    if a_k is not None:
        scores = scores + torch.einsum("bhid,bijd->bhij", q, a_k)  # q_i · a^K_ij, eq. (4)
    scores = scores * (d**-0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = scores.masked_fill(~causal_mask_ref(lq, lk, lk - lq).to(q.device), float("-inf"))
    alpha = torch.softmax(scores, dim=-1)
    out = alpha @ v
    if a_v is not None:
        out = out + torch.einsum("bhij,bijd->bhid", alpha, a_v)  # Σ_j α_ij a^V_ij, eq. (3)
    return out


def _linear(layer, x):
    """``x Wᵀ + b`` in float64 with ``layer``'s weight (and bias, if it has one)."""
    out = x @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def mha_ref(mha, x, position_ids=None):
    """pebook.MultiHeadAttention written out with its own parameters, float64, no cache.

    x (+ an input encoding's rows) → one ``qkv`` projection whose output features are
    ``[n_heads query heads | n_kv_heads key heads | n_kv_heads value heads]``, each head-major
    → :func:`positional_attention_ref` with the layer's encoding, mask and scale → ``out``.
    Tokens are at ``position_ids`` (default ``0 … seq - 1``).
    """
    b, t, dim = x.shape
    x = x.double()
    pos = _ids(position_ids, b, range(t), x.device)
    if mha.position.place == "input":
        x = x + float64_encoding(mha.position).embed(pos, torch.float64)
    hd, nq, nkv = mha.head_dim, mha.n_heads, mha.n_kv_heads
    proj = _linear(mha.qkv, x)
    q, k, v = proj.split((nq * hd, nkv * hd, nkv * hd), dim=-1)
    heads = lambda m, n: m.reshape(b, t, n, hd).transpose(1, 2)  # noqa: E731
    out = positional_attention_ref(
        heads(q, nq),
        heads(k, nkv),
        heads(v, nkv),
        mha.position,
        causal=mha.causal,
        position_ids=pos,
        key_position_ids=pos,
        scale=mha.scale,
    )
    return _linear(mha.out, out.transpose(1, 2).reshape(b, t, nq * hd))


def block_ref(block, x, position_ids=None):
    """pebook.TransformerBlock written out (float64): pre-LN residual updates x + attn(LN(x)),
    then x + W2 GELU(W1 LN(x) + b1) + b2 (GPT-2 style, Radford et al. 2019)."""
    x = x.double()
    ln = lambda norm, h: F.layer_norm(h, h.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)  # noqa: E731
    x = x + mha_ref(block.attn, ln(block.attn_norm, x), position_ids)
    first, last = block.mlp[0], block.mlp[2]
    return x + _linear(last, F.gelu(_linear(first, ln(block.mlp_norm, x))))


def tiny_lm_ref(model, tokens, position_ids=None):
    """pebook.TinyLM written out (float64): token embedding, plus the model's input encoding if it
    has one (once, at the input), the blocks (:func:`block_ref`), a final LayerNorm and the
    unembedding. Tokens are at ``position_ids`` (default ``0 … seq - 1``)."""
    b, t = tokens.shape
    pos = _ids(position_ids, b, range(t), tokens.device)
    x = model.token_embedding.weight.double()[tokens.long()]
    if model.encoding_module.place == "input":
        x = x + float64_encoding(model.encoding_module).embed(pos, torch.float64)
    for block in model.blocks:
        x = block_ref(block, x, pos)
    norm = model.final_norm
    x = F.layer_norm(x, x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)
    return _linear(model.lm_head, x)


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The float64 references above, as ``ref.shaw(...)``, ``ref.t5_bucket(...)``, ``ref.mha(...)``, …"""
    return SimpleNamespace(
        sinusoidal_table=sinusoidal_table_ref,
        frequencies=frequencies_ref,
        relative_index=relative_index_ref,
        causal_mask=causal_mask_ref,
        shaw=shaw_ref,
        t5_bucket=t5_bucket_ref,
        rope_pairs=rope_pairs,
        rope_matrix=rope_matrix_ref,
        rope=rope_ref,
        rope_rotate_half=rope_rotate_half_ref,
        alibi_slopes=alibi_slopes_ref,
        alibi_bias=alibi_bias_ref,
        attention=attention_ref,
        positional_attention=positional_attention_ref,
        mha=mha_ref,
        block=block_ref,
        float64_encoding=float64_encoding,
        tiny_lm=tiny_lm_ref,
    )
