"""pebook.book.experiments.retrieval: the passkey-retrieval task, its training, evaluation and results files."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook.book.experiments import retrieval as rt
from pebook.book.training import build_model

FILLER, PASSKEYS = set(rt.FILLER), set(rt.PASSKEYS)


def _micro(**kw):
    return dict(
        dim=16, n_layers=1, n_heads=2, train_len=8, steps=12, batch_size=8, lr=1e-2, seed=0, warmup_steps=2, **kw
    )


# ------------------------------------------------------------------------------------ the task


def test_alphabets_are_disjoint_and_fit_the_vocabulary():
    special = {rt.MARKER, rt.QUERY}
    assert len(special) == 2 and not FILLER & PASSKEYS and not (FILLER | PASSKEYS) & special
    assert max(FILLER | PASSKEYS | special) < rt.VOCAB_SIZE == 256
    assert len(PASSKEYS) == 10


@given(
    batch=st.integers(1, 6),
    length=st.integers(3, 40),
    seed=st.integers(0, 2**31),
    mode=st.sampled_from(["none", "int", "pair"]),
    data=st.data(),
)
def test_make_batch_places_marker_passkey_and_query(batch, length, seed, mode, data):
    if mode == "none":
        distance = None
    elif mode == "int":
        distance = data.draw(st.integers(1, length - 2))
    else:
        lo = data.draw(st.integers(1, length - 2))
        distance = (lo, data.draw(st.integers(lo, length - 2)))
    inputs, targets, distances = rt.make_batch(batch, length, torch.Generator().manual_seed(seed), distance=distance)
    assert inputs.shape == (batch, length) and targets.shape == distances.shape == (batch,)
    assert inputs.dtype == targets.dtype == distances.dtype == torch.long
    for row, key, d in zip(inputs.tolist(), targets.tolist(), distances.tolist()):
        if distance is None:
            assert 1 <= d <= length - 2
        elif mode == "int":
            assert d == distance
        else:
            assert distance[0] <= d <= distance[1]
        where = length - 1 - d  # the passkey's position; the distance is measured from it to the query
        assert row[-1] == rt.QUERY and row[where] == key and key in PASSKEYS and row[where - 1] == rt.MARKER
        rest = row[: where - 1] + row[where + 1 : -1]
        assert all(t in FILLER for t in rest)  # exactly one marker, one passkey, one query
    again = rt.make_batch(batch, length, torch.Generator().manual_seed(seed), distance=distance)
    assert all(torch.equal(a, b) for a, b in zip((inputs, targets, distances), again))


def test_make_batch_covers_every_distance_and_passkey():
    _, targets, distances = rt.make_batch(2000, 12, torch.Generator().manual_seed(0))
    assert set(distances.tolist()) == set(range(1, 11))
    assert set(targets.tolist()) == PASSKEYS


def test_make_batch_snapshot():
    """Frozen values for seed 0 (any change of the draws changes every experiment's data)."""
    inputs, targets, distances = rt.make_batch(3, 10, torch.Generator().manual_seed(0))
    assert distances.tolist() == [1, 4, 6]
    assert targets.tolist() == [161, 162, 163]
    assert inputs.tolist() == [
        [76, 79, 85, 32, 35, 91, 35, 128, 161, 129],
        [53, 82, 68, 55, 128, 162, 56, 44, 90, 129],
        [70, 71, 128, 163, 56, 49, 69, 57, 45, 129],
    ]


def test_make_batch_rejects_bad_arguments():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="length must be an int >= 3"):
        rt.make_batch(2, 2, g)
    with pytest.raises(TypeError, match="length must be an int"):
        rt.make_batch(2, 8.0, g)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        rt.make_batch(0, 8, g)
    with pytest.raises(ValueError, match=r"distance must lie in 1 … length - 2 = 6 \(length=8\), got 7 … 7"):
        rt.make_batch(2, 8, g, distance=7)
    with pytest.raises(ValueError, match="distance must lie in"):
        rt.make_batch(2, 8, g, distance=0)
    with pytest.raises(ValueError, match="distance must be a pair"):
        rt.make_batch(2, 8, g, distance=(4, 2))
    with pytest.raises(TypeError, match="distance must be an int"):
        rt.make_batch(2, 8, g, distance=2.5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        rt.make_batch(2, 8, 0)


def test_distance_bins():
    assert rt.distance_bins(8, 8) == [(0, 6)]
    assert rt.distance_bins(8, 64) == [(0, 8), (8, 16), (16, 32), (32, 62)]
    assert rt.distance_bins(8, 32, "linear") == [(0, 8), (8, 16), (16, 24), (24, 30)]
    with pytest.raises(ValueError, match="scheme must be"):
        rt.distance_bins(8, 32, "log")


# ------------------------------------------------------------------------------------ training and evaluation


def test_training_lowers_the_loss_and_is_deterministic():
    a, history = rt.train_retrieval("rope", **_micro(), device="cpu", log_every=4, return_history=True)
    b = rt.train_retrieval("rope", **_micro(), device="cpu")
    assert [s for s, _ in history] == [4, 8, 12]
    assert history[-1][1] < history[0][1]
    assert not a.training and a.max_positions == 8
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = rt.train_retrieval("rope", **{**_micro(), "seed": 1}, device="cpu")
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)


def test_train_retrieval_rejects_bad_arguments():
    with pytest.raises(ValueError, match="encoding must be one of"):
        rt.train_retrieval("unknown_pe", **_micro())
    with pytest.raises(ValueError, match="train_len|length must be an int >= 3"):
        rt.train_retrieval("rope", **{**_micro(), "train_len": 2})
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        rt.train_retrieval("rope", **{**_micro(), "lr": 0.0})
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        rt.train_retrieval("rope", **{**_micro(), "seed": -1})


def test_evaluate_records_accuracy_by_bin_and_refusals(device):
    learned = build_model("learned", dim=16, n_layers=1, n_heads=2, max_positions=8).to(device)
    records = rt.evaluate_retrieval(learned, [8, 16, 32], n_per_cell=5, seed=0, batch_size=2)
    assert [(r["length"], r["distance_bin"], r["n"]) for r in records[:1]] == [(8, [0, 6], 5)]
    assert 0.0 <= records[0]["accuracy"] <= 1.0 and records[0]["loss"] > 0
    assert [r["length"] for r in records[1:]] == [16, 32]
    assert all("beyond this learned table" in r["refused"] for r in records[1:])
    rope = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=8).to(device)
    records = rt.evaluate_retrieval(rope, [8, 32], [(0, 8), (8, 100)], n_per_cell=4, seed=3, batch_size=3)
    assert [(r["length"], r["distance_bin"]) for r in records] == [(8, [0, 6]), (32, [0, 8]), (32, [8, 30])]
    # the same sequences whatever the batch size and whichever other lengths are evaluated
    again = rt.evaluate_retrieval(rope, [32], [(0, 8), (8, 100)], n_per_cell=4, seed=3, batch_size=4)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in records[1:]]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in records[1:]], rel=1e-6)


def test_evaluate_retrieval_rejects_bad_arguments():
    model = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=8)
    with pytest.raises(ValueError, match="n_per_cell must be an int >= 1"):
        rt.evaluate_retrieval(model, [8], n_per_cell=0, seed=0)
    with pytest.raises(TypeError, match="lengths must be a non-empty sequence"):
        rt.evaluate_retrieval(model, 8, n_per_cell=1, seed=0)
    with pytest.raises(ValueError, match="length must be an int >= 3"):
        rt.evaluate_retrieval(model, [8, 2], n_per_cell=1, seed=0)
    with pytest.raises(ValueError, match="bins must be"):
        rt.evaluate_retrieval(model, [8], "log", n_per_cell=1, seed=0)
    with pytest.raises(ValueError, match="bins must be"):
        rt.evaluate_retrieval(model, [8], [(4, 2)], n_per_cell=1, seed=0)


# ------------------------------------------------------------------------------------ runs and results files


@pytest.fixture(scope="module")
def micro_runs():
    """The micro preset run in two parts (rope; learned with seeds 0 and 1) and whole."""
    part_a = rt.run("micro", encodings=["rope"], device="cpu")
    part_b = rt.run("micro", encodings=["learned"], seeds=[1, 0], device="cpu")
    return part_a, part_b


def test_micro_run_results(micro_runs):
    part_a, part_b = micro_runs
    rt.validate_results(part_a)
    assert json.loads(json.dumps(part_a)) == part_a  # JSON-ready
    assert part_a["schema"] == rt.SCHEMA and part_a["preset"] == "micro" and part_a["device"] == "cpu"
    assert part_a["encodings"] == ["rope"] and part_a["seeds"] == [0]
    assert "encodings" not in part_a["config"] and part_a["config"]["steps"] == 10
    assert part_a["versions"]["torch"] == torch.__version__ and part_a["wall_time_s"] > 0
    record = part_a["results"]["rope"]["0"]
    assert [e["length"] for e in record["eval"]] == [8, 16, 16, 32, 32, 32]
    assert [e["distance_bin"] for e in record["eval"][-3:]] == [[0, 8], [8, 16], [16, 30]]
    for results in micro_runs:  # training lowers the loss
        for name, by_seed in results["results"].items():
            for seed, record in by_seed.items():
                assert record["history"][-1][1] < record["history"][0][1] - 0.3, (name, seed)
    learned = part_b["results"]["learned"]
    assert list(learned) == ["1", "0"] and "accuracy" in learned["0"]["eval"][0]
    assert [e["length"] for e in learned["0"]["eval"][1:]] == [16, 32] and "refused" in learned["0"]["eval"][1]


def test_merge_results(micro_runs):
    part_a, part_b = micro_runs
    before = json.dumps(part_b)
    merged = rt.merge_results(part_b, part_a)
    assert json.dumps(part_b) == before  # arguments untouched
    assert merged["encodings"] == ["rope", "learned"]  # the preset's order
    assert merged["seeds"] == [0, 1] and list(merged["results"]["learned"]) == ["0", "1"]
    assert merged["results"]["rope"] == part_a["results"]["rope"]
    assert len(merged["runs"]) == 2
    assert merged["wall_time_s"] == pytest.approx(part_a["wall_time_s"] + part_b["wall_time_s"])
    rt.validate_results(merged)
    with pytest.raises(ValueError, match="both results hold encoding 'rope' seed 0"):
        rt.merge_results(merged, part_a)
    assert rt.merge_results(merged, part_a, replace=True)["results"] == merged["results"]
    other = json.loads(json.dumps(part_a))
    other["config"]["steps"] = 9
    with pytest.raises(ValueError, match=r"different hyper-parameters \(steps: 10 vs 9\)"):
        rt.merge_results(part_b, other)
    other["preset"] = "chapter"
    with pytest.raises(ValueError, match="preset 'chapter' into preset 'micro'"):
        rt.merge_results(part_b, other)
    with pytest.raises(ValueError, match="schema"):
        rt.merge_results(part_b, {**part_a, "schema": "pebook.extrapolation/1"})


def test_a_seed_is_the_same_run_alone_or_with_others(micro_runs):
    """Seed 0 of 'learned' trained alongside seed 1 equals it trained alone (bitwise, one machine)."""
    alone = rt.run("micro", encodings=["learned"], seeds=[0], device="cpu")
    assert alone["results"]["learned"]["0"]["history"] == micro_runs[1]["results"]["learned"]["0"]["history"]
    assert alone["results"]["learned"]["0"]["eval"] == micro_runs[1]["results"]["learned"]["0"]["eval"]


def test_preset_config_and_run_reject_bad_arguments():
    assert rt.preset_config("chapter")["encodings"] == ("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi")
    assert rt.preset_config("full")["seeds"] == (0, 1, 2)
    with pytest.raises(ValueError, match="preset must be one of"):
        rt.preset_config("huge")
    with pytest.raises(ValueError, match="unknown hyper-parameter 'stepz'"):
        rt.preset_config("micro", stepz=3)
    with pytest.raises(ValueError, match=r"encodings must be among \(.*\), got 'unknown_pe'"):
        rt.run("micro", encodings=["unknown_pe"])
    with pytest.raises(ValueError, match="seeds must not repeat"):
        rt.run("micro", seeds=[0, 0])
    with pytest.raises(ValueError, match="seeds must be an int >= 0"):
        rt.run("micro", seeds=[-1])
    with pytest.raises(ValueError, match="eval_multiples must increase and start at 1"):
        rt.preset_config("micro", eval_multiples=(2, 4))


def test_main_writes_and_merges(tmp_path, capsys):
    out = tmp_path / "r.json"
    common = ["--preset", "micro", "--device", "cpu", "--no-progress"]
    assert rt.main([*common, "--encodings", "rope", "--out", str(out)]) == 0
    assert rt.main([*common, "--encodings", "learned", "--seeds", "0", "--merge-into", str(out)]) == 0
    merged = json.loads(out.read_text())
    rt.validate_results(merged)
    assert merged["encodings"] == ["rope", "learned"] and len(merged["runs"]) == 2
    printed = capsys.readouterr().out
    assert "ref." in printed and str(out) in printed
    with pytest.raises(SystemExit):  # refused before training
        rt.main([*common, "--encodings", "rope,alibi", "--merge-into", str(out)])
    assert "holds encoding 'rope' seed 0 already" in capsys.readouterr().err


def test_committed_chapter_results_match_the_preset():
    results = rt.load_results()
    assert results["preset"] == "chapter"
    assert results["seeds"] == [0, 1, 2]
    assert results["config"] == json.loads(json.dumps(rt._hyper_parameters(rt.preset_config("chapter"))))
    assert results["device_name"] and results["wall_time_s"] > 0
