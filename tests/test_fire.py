"""pebook.fire: FIRE's learned, progressively interpolated bias (Li et al. 2024, arXiv:2310.04418).

Reference: :func:`fire_bias_ref` below writes the paper's bias element by element in Python floats,
b(i, j) = f_θ(ψ(i - j) / ψ(max{L, i})) with ψ(x) = log(c·x + 1) and f_θ the one-hidden-layer ReLU
MLP, with the reference code's conventions (class ``FIRE`` of github.com/mcleish7/arithmetic, see
pebook/fire.py): |c·x| inside the log, L = |multiplier · L₀|,
``+ 1e-6`` on the normaliser, and |i - j| for keys after the query. It reads only the module's
parameter values. The fit test trains the MLP to ALiBi's biases (the paper shows FIRE can
represent ALiBi).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pebook
from pebook import alibi_slopes
from pebook.fire import FIRE, FIRE_EPS, FIRE_MLP_WIDTH, fire_interpolation, fire_log_transform

F64 = torch.float64


def fire_module(n_heads=3, width=5, c=0.1, threshold=6.0, *, seed=0, device="cpu"):
    """A float64 FIRE with seeded nn.Linear-initialised MLP weights, ``c`` and ``L`` as given."""
    torch.manual_seed(seed)
    enc = FIRE(n_heads=n_heads, fire_mlp_width=width, fire_init_c=c, fire_init_threshold=threshold)
    return enc.double().to(device)


def set_mlp(enc, hidden_weight, hidden_bias, out_weight, out_bias):
    """Replace the MLP's weights by hand-chosen values (lists)."""
    with torch.no_grad():
        for p, value in (
            (enc.mlp_hidden.weight, [[w] for w in hidden_weight]),
            (enc.mlp_hidden.bias, hidden_bias),
            (enc.mlp_out.weight, out_weight),
            (enc.mlp_out.bias, out_bias),
        ):
            p.copy_(torch.tensor(value, dtype=p.dtype))


def parameters_of(enc):
    """The module's parameter values as Python floats: c, L = |multiplier · L₀|, and the MLP's."""
    return dict(
        c=enc.c.item(),
        L=abs(enc.threshold_multiplier.item() * enc.init_threshold.item()),
        w1=enc.mlp_hidden.weight[:, 0].tolist(),
        b1=enc.mlp_hidden.bias.tolist(),
        w2=enc.mlp_out.weight.tolist(),
        b2=enc.mlp_out.bias.tolist(),
    )


def psi_ref(x, c):
    """ψ(x) = log(c·x + 1), with the reference code's |c·x|."""
    return math.log(abs(c * x) + 1)


def interpolation_ref(i, j, c, L):
    """ψ(|i - j|) / (ψ(max{L, i}) + 1e-6): the paper's input of f_θ plus the reference code's eps."""
    return psi_ref(abs(i - j), c) / (psi_ref(max(L, i), c) + 1e-6)


def mlp_ref(x, p, h):
    """f_θ(x) for head h: Σ_k W₂[h, k] · max(0, w₁[k] x + b₁[k]) + b₂[h]."""
    return sum(w2 * max(0.0, w1 * x + b1) for w1, b1, w2 in zip(p["w1"], p["b1"], p["w2"][h])) + p["b2"][h]


def fire_bias_ref(p, q_positions, k_positions):
    """b_h(i, j) = f_θ(ψ(i - j) / ψ(max{L, i}))_h, shape (heads, len(q), len(k)), float64."""
    rows = [
        [[mlp_ref(interpolation_ref(i, j, p["c"], p["L"]), p, h) for j in k_positions] for i in q_positions]
        for h in range(len(p["b2"]))
    ]
    return torch.tensor(rows, dtype=F64).reshape(len(p["b2"]), len(q_positions), len(k_positions))


# ---------------------------------------------------------------- (1) reference


@pytest.mark.parametrize("c,threshold", [(0.1, 6.0), (1.0, 512.0), (2.5, 0.5)])
def test_module_bias_at_position_ids_matches_reference(device, c, threshold):
    """FIRE.logit_bias[b, h, i, j] = b_h(q_pos[b, i], k_pos[b, j]) at batched, unordered positions
    below and far beyond L, with keys before and after the queries."""
    enc = fire_module(4, 7, c, threshold, seed=1, device=device)
    q_pos = torch.tensor([[0, 7, 300, 3], [5, 5, 1, 0]], device=device)
    k_pos = torch.tensor([[0, 1, 2, 20, 150, 299], [400, 3, 5, 9, 0, 1]], device=device)
    bias = enc.logit_bias(q_pos, k_pos)
    assert bias.shape == (2, 4, 4, 6) and bias.dtype == F64 and bias.device.type == device.type
    p = parameters_of(enc)
    for b in range(2):
        expected = fire_bias_ref(p, q_pos[b].tolist(), k_pos[b].tolist())
        torch.testing.assert_close(bias[b].detach().cpu(), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False])
def test_module_in_attention_matches_reference(device, rand, ref, causal):
    """softmax(q kᵀ/√d + b) v over a cache (queries at 4, 5 over keys 0 … 5, L = 4.5), with the
    reference bias."""
    enc = fire_module(4, 6, 0.3, 4.5, seed=2, device=device)
    q, k, v = rand(2, 4, 2, 8, seed=0, device=device), *(rand(2, 4, 6, 8, seed=s, device=device) for s in (1, 2))
    out = pebook.positional_attention(q, k, v, enc, causal=causal)
    bias = fire_bias_ref(parameters_of(enc), range(4, 6), range(6)).to(device)
    torch.testing.assert_close(out, ref.attention(q, k, v, bias=bias, causal=causal), rtol=1e-12, atol=1e-12)


def test_interpolation_and_log_transform_match_reference(device):
    q_pos = torch.tensor([[0], [3], [9], [40]], device=device)
    k_pos = torch.tensor([[0, 1, 3, 9, 40]], device=device)
    for c, L in ((0.1, 512.0), (0.7, 5.0), (-0.7, -5.0)):
        ct, Lt = torch.tensor(c, dtype=F64, device=device), torch.tensor(L, dtype=F64, device=device)
        got = fire_interpolation(q_pos, k_pos, ct, Lt).cpu()
        expected = [[interpolation_ref(i, j, c, abs(L)) for j in k_pos[0].tolist()] for i in q_pos[:, 0].tolist()]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)
        psi = fire_log_transform(torch.arange(6, device=device), ct).cpu()
        torch.testing.assert_close(psi, torch.tensor([psi_ref(x, c) for x in range(6)], dtype=F64), rtol=1e-15, atol=0)


# ---------------------------------------------------------------- (2) properties


def interpolation_args(data, device):
    """Hypothesis draws: c in [0.001, 10] (either sign), L in [0.5, 600] (either sign)."""
    c = data.draw(st.floats(1e-3, 10.0)) * data.draw(st.sampled_from([1, -1]))
    L = data.draw(st.floats(0.5, 600.0)) * data.draw(st.sampled_from([1, -1]))
    return torch.tensor(c, dtype=F64, device=device), torch.tensor(L, dtype=F64, device=device)


@given(data=st.data(), query=st.integers(0, 3000))
def test_interpolation_is_in_the_unit_interval_and_increases_with_distance(device, data, query):
    """Progressive interpolation: for keys 0 … i before a query at i, the input of f_θ is in
    [0, 1), 0 at distance 0, and strictly increasing in the distance i - j (ψ is increasing)."""
    c, L = interpolation_args(data, device)
    k_pos = torch.arange(query + 1, device=device).flip(0)  # distances 0 … i
    x = fire_interpolation(torch.tensor([query], device=device), k_pos, c, L)
    assert x[0] == 0 and (x >= 0).all() and (x < 1).all()
    assert (x[1:] > x[:-1]).all()


@given(data=st.data(), query=st.integers(0, 700), distance=st.integers(0, 700), shift=st.integers(0, 700))
def test_bias_depends_on_the_query_only_through_the_normaliser(device, data, query, distance, shift):
    """At a fixed distance d = i - j, b(i, i - d) depends on i only through ψ(max{L, i}): moving
    the pair by s changes nothing while both query positions are <= L (bit for bit), and moves the
    input of f_θ strictly down once the moved query is beyond both L and the original query."""
    c, L = interpolation_args(data, device)
    distance = min(distance, query)
    i, moved = torch.tensor([query], device=device), torch.tensor([query + shift], device=device)
    x = fire_interpolation(i, i - distance, c, L)
    x_moved = fire_interpolation(moved, moved - distance, c, L)
    if query + shift <= L.abs():
        assert torch.equal(x_moved, x)
    elif distance > 0 and query + shift >= max(L.abs().item(), query) + 1:
        assert x_moved < x


@given(data=st.data(), n_heads=st.integers(1, 4), width=st.integers(1, 6), positions=st.lists(st.integers(0, 900)))
def test_bias_at_distance_zero_is_f_of_zero(device, data, n_heads, width, positions):
    """b(i, i) = f_θ(0) = W₂ ReLU(b₁) + b₂ for every query position i, whatever c and L."""
    c, L = interpolation_args(data, device)
    enc = fire_module(n_heads, width, abs(c.item()), abs(L.item()), seed=data.draw(st.integers(0, 99)), device=device)
    pos = torch.tensor([positions], dtype=torch.long, device=device)
    diagonal = enc.logit_bias(pos, pos).diagonal(dim1=-2, dim2=-1)[0]  # (heads, len)
    f0 = enc.mlp_out.weight @ torch.relu(enc.mlp_hidden.bias) + enc.mlp_out.bias
    torch.testing.assert_close(diagonal, f0[:, None].expand_as(diagonal), rtol=1e-15, atol=1e-15)


@given(data=st.data(), query=st.integers(1, 5000))
def test_first_key_beyond_the_threshold_is_f_of_one(device, data, query):
    """Beyond L the key at position 0 is at the full relative distance i: its input is
    ψ(i) / (ψ(i) + 1e-6), i.e. 1 up to the reference code's eps, for every such query; below L it
    is ψ(i) / ψ(L) < 1 (adaptive thresholding)."""
    c, L = interpolation_args(data, device)
    x = fire_interpolation(torch.tensor([query], device=device), torch.tensor([0], device=device), c, L)
    psi = math.log(abs(c.item()) * query + 1)
    if query >= L.abs():
        assert x.item() == pytest.approx(psi / (psi + FIRE_EPS), rel=1e-14)
        assert 1 - x.item() < FIRE_EPS / psi * 1.01
    else:  # a short sequence is not stretched to 1: ψ(i) / ψ(L)
        assert x.item() == pytest.approx(psi / (math.log(abs(c.item() * L.item()) + 1) + FIRE_EPS), rel=1e-14)
        assert x.item() < 1


@given(data=st.data(), query=st.integers(0, 300), distance=st.integers(0, 300))
def test_keys_after_the_query_mirror_keys_before_it(device, data, query, distance):
    """Without a causal mask a key d positions after the query gets the bias of one d before it
    (the reference code's |i - j|), when both exist."""
    enc = fire_module(3, 4, 0.2, 50.0, seed=data.draw(st.integers(0, 99)), device=device)
    distance = min(distance, query)
    i = torch.tensor([[query]], device=device)
    before = enc.logit_bias(i, i - distance)
    assert torch.equal(enc.logit_bias(i, i + distance), before)


def test_signs_of_c_and_the_multiplier_do_not_matter(device):
    """The reference code takes |c·x| and |multiplier · L₀|: flipping either sign leaves the bias."""
    enc = fire_module(2, 3, 0.4, 3.0, device=device)
    pos = torch.arange(8, device=device)[None]
    bias = enc.logit_bias(pos, pos)
    with torch.no_grad():
        enc.c.neg_()
        enc.threshold_multiplier.neg_()
    assert enc.c.item() < 0 and enc.threshold.item() == 3.0
    assert torch.equal(enc.logit_bias(pos, pos), bias)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_is_shift_invariant_below_the_threshold_only(device, rand, causal):
    """Moving every query and key by the same offset leaves attention unchanged while every query
    stays at or below L = 40 (a relative encoding there) and changes it beyond (max{L, i} moves)."""
    enc = fire_module(4, 8, 0.5, 40.0, seed=3, device=device)
    q, k, v = rand(2, 4, 3, 8, seed=8, device=device), *(rand(2, 4, 7, 8, seed=s, device=device) for s in (9, 10))
    k_pos = torch.tensor([[0, 2, 3, 7, 8, 9, 12], [1, 2, 3, 4, 5, 6, 7]], device=device)
    q_pos = k_pos[:, -3:]

    def attend(shift):
        return pebook.positional_attention(
            q, k, v, enc, causal=causal, position_ids=q_pos + shift, key_position_ids=k_pos + shift
        )

    out = attend(0)
    torch.testing.assert_close(attend(28), out, rtol=1e-13, atol=1e-13)  # largest query at 12 + 28 = 40
    assert (attend(1000) - out).abs().max() > 1e-3


def test_every_parameter_learns(device):
    """A loss of the bias at queries below and beyond L gives every parameter a gradient (L's
    multiplier through the queries below L, where max{L, i} = L)."""
    enc = fire_module(2, 4, 0.1, 5.0, seed=4, device=device)
    pos = torch.arange(12, device=device)[None]
    enc.logit_bias(pos, pos).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_initial_values_follow_the_reference():
    """Reference code: c = 0.1, L = 512 (a fixed L₀ times a multiplier 1), nn.Linear's default
    initialisation U(-1/√fan_in, 1/√fan_in) for the MLP: U(-1, 1) into the hidden layer, U(±1/√32)
    out of it."""
    torch.manual_seed(5)
    enc = FIRE(n_heads=200)
    assert enc.c.item() == pytest.approx(0.1) and enc.threshold_multiplier.item() == 1.0
    assert enc.init_threshold.item() == 512.0 and enc.threshold.item() == 512.0
    assert enc.mlp_hidden.weight.shape == (FIRE_MLP_WIDTH, 1) and enc.mlp_out.weight.shape == (200, FIRE_MLP_WIDTH)
    for p, top in ((enc.mlp_hidden.weight, 1.0), (enc.mlp_hidden.bias, 1.0), (enc.mlp_out.weight, 32**-0.5)):
        assert p.abs().max() <= top and p.abs().max() > 0.9 * top


# ---------------------------------------------------------------- FIRE represents ALiBi


def test_fit_to_alibi():
    """The paper shows FIRE can represent ALiBi's -m_h (i - j). Fitting f_θ, c and L with 500 Adam
    steps (float64, seeded, under a second on one CPU core) to ALiBi with 4 heads on every causal
    pair of a 32-token sequence (so on every sequence of length <= 32) leaves a per-head maximum
    error below 3% of that head's largest bias (seed 0: 0.9%; seeds 0-9: 0.8% to 7.1%), from 48%
    or more at initialisation. The fit learns a nearly linear ψ (|c| from 0.1 to about 0.001) and
    lowers L from 512 to about the sequence length, where ψ(i - j)/ψ(L) ≈ (i - j)/L and a linear
    f_θ is ALiBi."""
    torch.manual_seed(0)
    n_heads, length = 4, 32
    enc = FIRE(n_heads=n_heads).double()
    pos = torch.arange(length)
    causal = pos[None, :] <= pos[:, None]
    slopes = alibi_slopes(n_heads, dtype=F64)
    target = (-slopes[:, None, None] * (pos[:, None] - pos[None, :]))[:, causal]  # (heads, pairs)
    largest = target.abs().amax(-1)

    def relative_error():
        return (enc.logit_bias(pos[None], pos[None])[0][:, causal] - target).abs().amax(-1) / largest

    with torch.no_grad():
        assert (relative_error() > 0.4).all()
    optimizer = torch.optim.Adam(enc.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[400], gamma=0.1)
    for _ in range(500):
        loss = (enc.logit_bias(pos[None], pos[None])[0][:, causal] - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        assert (relative_error() < 0.03).all(), relative_error()
    assert abs(enc.c.item()) < 0.01 and 20 < enc.threshold.item() < 64


# ---------------------------------------------------------------- (3) frozen snapshots


def snapshot_module(device):
    """Two heads, one hidden unit ReLU(x): f(x) = (2x, 0.5 - x); c = 1 (ψ(x) = ln(1 + x)), L = 3."""
    enc = fire_module(2, 1, 1.0, 3.0, device=device)
    set_mlp(enc, [1.0], [0.0], [[2.0], [-1.0]], [0.0, 0.5])
    return enc


def test_snapshot_below_the_threshold(device):
    """Query at 2 < L = 3 over keys 0, 1, 2: inputs ln 3 / ln 4, ln 2 / ln 4 = 1/2, 0 (each over
    ln 4 + 1e-6), so head 0 gives 2x and head 1 gives 1/2 - x."""
    bias = snapshot_module(device).logit_bias(torch.tensor([[2]], device=device), torch.arange(3, device=device)[None])
    ln4 = math.log(4) + 1e-6
    x = [math.log(3) / ln4, math.log(2) / ln4, 0.0]
    expected = torch.tensor([[[2 * v for v in x]], [[0.5 - v for v in x]]], dtype=F64)
    torch.testing.assert_close(bias[0].detach().cpu(), expected, rtol=1e-15, atol=0)
    assert bias[0, 0, 0, 1].item() == pytest.approx(1.0, abs=1e-6)  # 2 · (1/2)


def test_snapshot_beyond_the_threshold(device):
    """Query at 7 > L = 3 over keys 0, 4, 6, 7: distances 7, 3, 1, 0, inputs ln 8, ln 4, ln 2, 0
    over ln 8 + 1e-6, i.e. 1, 2/3, 1/3, 0 up to the eps: head 0 gives 2, 4/3, 2/3, 0."""
    enc = snapshot_module(device)
    bias = enc.logit_bias(torch.tensor([[7]], device=device), torch.tensor([[0, 4, 6, 7]], device=device))
    shrink = math.log(8) / (math.log(8) + 1e-6)
    expected = torch.tensor([2.0, 4 / 3, 2 / 3, 0.0], dtype=F64) * shrink
    torch.testing.assert_close(bias[0, 0, 0].detach().cpu(), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(bias[0, 1, 0].detach().cpu(), 0.5 - expected / 2, rtol=1e-15, atol=0)


def test_snapshot_options_and_parameters():
    assert pebook.encoding_options("fire") == {
        "fire_mlp_width": 32,
        "fire_init_c": 0.1,
        "fire_init_threshold": 512.0,
    }
    enc = pebook.build_encoding("fire", dim=16, n_heads=4, head_dim=4, causal=True)
    assert enc.declared_parameters() == {
        "c": ((), True),
        "threshold_multiplier": ((), True),
        "mlp_hidden.weight": ((32, 1), True),
        "mlp_hidden.bias": ((32,), True),
        "mlp_out.weight": ((4, 32), True),
        "mlp_out.bias": ((4,), True),
        "init_threshold": ((), False),
    }
    assert enc.num_learned_parameters() == 2 + 32 + 32 + 4 * 32 + 4 == 198
    assert not FIRE.shared_across_layers  # FIRE, not FIRE-S: one module per layer
    assert repr(enc).startswith(
        "FIRE(\n  n_heads=4, fire_mlp_width=32, fire_init_c=0.1, fire_init_threshold=512.0\n"
        "  (mlp_hidden): Linear(in_features=1, out_features=32, bias=True)"
    )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(n_heads=0), ValueError, r"n_heads must be an int >= 1, got 0$"),
        (dict(fire_mlp_width=0), ValueError, r"fire_mlp_width must be an int >= 1, got 0$"),
        (dict(fire_mlp_width=8.0), TypeError, r"fire_mlp_width must be an int, got 8.0 of type float$"),
        (dict(fire_init_c=0.0), ValueError, r"fire_init_c must be a finite number > 0, got 0.0$"),
        (dict(fire_init_c="0.1"), TypeError, r"fire_init_c must be a real number, got '0.1' of type str$"),
        (dict(fire_init_threshold=-1), ValueError, r"fire_init_threshold must be a finite number > 0, got -1.0$"),
        (dict(fire_init_threshold=math.inf), ValueError, r"fire_init_threshold must be a finite number > 0, got inf$"),
    ],
)
def test_module_rejects_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        FIRE(**({"n_heads": 2} | kwargs))


def test_layer_rejects_a_bad_option():
    with pytest.raises(ValueError, match=r"fire_mlp_width must be an int >= 1, got 0$"):
        pebook.MultiHeadAttention(16, 4, "fire", fire_mlp_width=0)


def test_functions_reject_bad_arguments(device):
    c = torch.tensor(0.1, dtype=F64, device=device)
    pos = torch.arange(3, device=device)
    with pytest.raises(ValueError, match=r"x must be >= 0 \(a distance or a position\), got a minimum of -2$"):
        fire_log_transform(torch.tensor([1, -2], device=device), c)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list$"):
        fire_log_transform([1, 2], c)
    with pytest.raises(TypeError, match=r"c must be a floating-point tensor, got dtype torch.int64$"):
        fire_log_transform(pos, torch.tensor(1, device=device))
    with pytest.raises(TypeError, match=r"q_pos must be an integer tensor, got dtype torch.float64$"):
        fire_interpolation(pos.double(), pos, c, c)
    with pytest.raises(TypeError, match=r"threshold must be a torch.Tensor, got float$"):
        fire_interpolation(pos, pos, c, 512.0)
    with pytest.raises(ValueError, match=r"k_pos must be >= 0, got a minimum of -1$"):
        fire_interpolation(pos, pos - 1, c, c)


def test_functions_reject_mixed_devices(cuda_device):
    c = torch.tensor(0.1, dtype=F64)
    with pytest.raises(ValueError, match=r"c is on cuda:0 but x is on cpu"):
        fire_log_transform(torch.arange(3), c.to(cuda_device))
    with pytest.raises(ValueError, match=r"k_pos is on cuda:0 but q_pos is on cpu"):
        fire_interpolation(torch.arange(3), torch.arange(3, device=cuda_device), c, c)


def test_logit_bias_runs_the_hidden_layer_once_per_pair_and_equals_the_per_head_score(device):
    """FIRE.logit_bias (one hidden-layer pass for all heads, one batch row when the rows agree)
    equals the generic LogitBias.logit_bias, which evaluates score head by head and row by row,
    bit for bit."""
    from pebook.encoding import LogitBias

    torch.manual_seed(0)
    enc = FIRE(n_heads=4, fire_mlp_width=8, fire_init_threshold=4.0).double().to(device)
    q = torch.tensor([[5, 2, 9, 0], [1, 1, 7, 3]], device=device)
    k = torch.tensor([[0, 1, 2, 3, 4, 9], [3, 3, 0, 8, 1, 2]], device=device)
    torch.testing.assert_close(enc.logit_bias(q, k), LogitBias.logit_bias(enc, q, k), rtol=0, atol=0)
    same = torch.arange(6, device=device).expand(3, 6)
    fast = enc.logit_bias(same, same)
    assert fast.shape == (1, 4, 6, 6)  # one row for the whole batch
    slow = LogitBias.logit_bias(enc, same, same)
    torch.testing.assert_close(fast.expand(3, -1, -1, -1), slow, rtol=0, atol=0)
