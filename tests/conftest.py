"""Shared fixtures and the float64 paper references for pebook's test suite.

Everything in the "references" section below is written from the papers' equations (or, where
a paper defers to code, from the published reference code, quoted) and never calls pebook.
Tests reach it through the ``ref`` fixture, so each reference exists once and every module's
tests compare pebook against the same independent implementation.

Devices: the ``device`` fixture runs a test on ``cpu`` and on ``cuda``; the ``cuda`` variant is
marked ``cuda`` (declared in pyproject.toml) and skipped when no GPU is present. TF32 is turned
off so that float32 matmuls on CUDA are IEEE float32 and the stated float32 tolerances hold.

Hypothesis: profile ``pebook`` (the default: few examples, derandomized so CI is reproducible)
or ``thorough`` (``HYPOTHESIS_PROFILE=thorough``: more examples, random seeds).
"""

from __future__ import annotations

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


def positional_attention_ref(q, k, v, encoding, params, causal: bool = True, offset: int | None = None):
    """float64 reference of attention with one encoding, assembled from the references above the
    way each paper combines its encoding with softmax(QKᵀ/√d) V:

    * none / sinusoidal / learned: plain attention (absolute encodings enter at the input);
    * rope: attention of R_{Θ,m} q_m over R_{Θ,n} k_n (RoFormer eq. 14);
    * alibi: bias -m_h (i - j) on the logits (Press et al. §3);
    * t5: bias table[bucket(j - i)] on the logits, bidirectional iff not causal (Raffel et al. §2.1);
    * shaw: eqs. (3)-(6) of Shaw et al.

    ``params`` uses positional_attention's keyword names (inv_freq/layout, slopes,
    bias_table/max_distance, rel_k/rel_v/max_distance).
    """
    q, k, v = q.double(), k.double(), v.double()
    params = {
        n: (p.double() if isinstance(p, torch.Tensor) and p.is_floating_point() else p) for n, p in params.items()
    }
    lq, lk = q.shape[-2], k.shape[-2]
    offset = lk - lq if offset is None else offset
    bias = None
    if encoding == "rope":
        theta = params["inv_freq"].cpu()
        layout = params.get("layout", "half")
        q = rope_ref(q, range(offset, offset + lq), theta, layout)
        k = rope_ref(k, range(lk), theta, layout)
    elif encoding == "alibi":
        bias = alibi_bias_ref(lq, lk, params["slopes"].tolist(), offset).to(q.device)
    elif encoding == "t5":
        table = params["bias_table"]
        relative = torch.arange(lk)[None, :] - torch.arange(offset, offset + lq)[:, None]  # j - i
        buckets = t5_bucket_ref(relative, not causal, table.shape[0], params.get("max_distance", 128))
        bias = table[buckets.to(q.device)].permute(2, 0, 1)
    elif encoding == "shaw":
        return shaw_ref(q, k, v, params["rel_k"], params["rel_v"], params["max_distance"], causal, offset)
    return attention_ref(q, k, v, bias, causal, offset)


def mha_ref(mha, x, *, past_len: int = 0):
    """pebook.MultiHeadAttention written out with its own parameters (float64): x (+ absolute
    encoding at positions past_len…) → q, k, v projections split into heads → positional
    attention reference → output projection. No past keys (past_len only shifts positions)."""
    b, t, dim = x.shape
    x = x.double()
    if mha.encoding == "sinusoidal":
        x = x + sinusoidal_table_ref(t, dim, mha.sinusoidal_base, past_len).to(x.device)
    elif mha.encoding == "learned":
        x = x + mha.position_embedding.weight[past_len : past_len + t].double()
    w, bias = mha.qkv.weight.double(), mha.qkv.bias.double()
    heads = lambda m: m.reshape(b, t, mha.n_heads, mha.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = (heads(x @ w[i * dim : (i + 1) * dim].T + bias[i * dim : (i + 1) * dim]) for i in range(3))
    params = {}
    if mha.encoding == "rope":
        params = {"inv_freq": mha.inv_freq, "layout": mha.rope_layout}
    elif mha.encoding == "alibi":
        params = {"slopes": mha.slopes}
    elif mha.encoding == "t5":
        params = {"bias_table": mha.t5_bias.bias.weight, "max_distance": mha.t5_bias.max_distance}
    elif mha.encoding == "shaw":
        params = {"rel_k": mha.rel_k, "rel_v": mha.rel_v, "max_distance": mha.max_distance}
    encoding = "none" if mha.encoding in ("sinusoidal", "learned") else mha.encoding
    out = positional_attention_ref(q, k, v, encoding, params, mha.causal, 0)
    return out.transpose(1, 2).reshape(b, t, dim) @ mha.out.weight.double().T + mha.out.bias.double()


def tiny_lm_ref(model, tokens, *, sinusoidal_base: float = 10000.0):
    """pebook.TinyLM written out (float64): token embedding (+ absolute encoding once), then per
    block the pre-LN residual updates x + attn(LN(x)), x + W2 GELU(W1 LN(x) + b1) + b2 (GPT-2
    style, Radford et al. 2019), a final LayerNorm and the unembedding."""
    t = tokens.shape[1]
    x = model.token_embedding.weight.double()[tokens]
    if model.encoding == "sinusoidal":
        x = x + sinusoidal_table_ref(t, model.dim, sinusoidal_base).to(x.device)
    elif model.encoding == "learned":
        x = x + model.position_embedding.weight[:t].double()
    ln = lambda norm, h: F.layer_norm(h, (model.dim,), norm.weight.double(), norm.bias.double(), norm.eps)  # noqa: E731
    for block in model.blocks:
        x = x + mha_ref(block.attn, ln(block.attn_norm, x))
        first, last = block.mlp[0], block.mlp[2]
        hidden = F.gelu(ln(block.mlp_norm, x) @ first.weight.double().T + first.bias.double())
        x = x + hidden @ last.weight.double().T + last.bias.double()
    return ln(model.final_norm, x) @ model.lm_head.weight.double().T


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The float64 paper references above, as ``ref.shaw(...)``, ``ref.t5_bucket(...)``, …"""
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
        tiny_lm=tiny_lm_ref,
    )
