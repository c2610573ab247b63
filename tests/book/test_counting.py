"""pebook.book.experiments.counting: the sentence-counting task, its training, evaluation and results files."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook.book.experiments import counting as ct
from pebook.book.training import build_model

WORDS, MARKS = set(ct.WORDS), set(ct.END_MARKS)


def _micro(**kw):
    return dict(
        dim=16, n_layers=1, n_heads=2, train_len=12, steps=12, batch_size=8, lr=1e-2, seed=0, warmup_steps=2, **kw
    )


# ------------------------------------------------------------------------------------ the task


def test_alphabets_are_disjoint_and_fit_the_vocabulary():
    assert len(WORDS) == 20 and len(MARKS) == 4 and not WORDS & MARKS and ct.QUERY not in WORDS | MARKS
    assert max(WORDS | MARKS | {ct.QUERY}) < ct.VOCAB_SIZE == 256


@given(
    batch=st.integers(1, 5),
    back=st.integers(1, 4),
    max_words=st.integers(1, 5),
    extra=st.integers(0, 20),
    seed=st.integers(0, 2**31),
)
def test_make_batch_targets_the_end_mark_of_the_sentence_back_sentences_back(batch, back, max_words, extra, seed):
    length = ct.min_length(back, max_words) + extra
    inputs, targets, distances = ct.make_batch(
        batch, length, torch.Generator().manual_seed(seed), back=back, max_words=max_words
    )
    assert inputs.shape == (batch, length) and targets.shape == distances.shape == (batch,)
    assert inputs.dtype == targets.dtype == distances.dtype == torch.long
    for row, target, distance in zip(inputs.tolist(), targets.tolist(), distances.tolist()):
        assert row[-1] == ct.QUERY and all(t in WORDS | MARKS for t in row[:-1])
        ends = [i for i, t in enumerate(row) if t in MARKS]
        assert len(ends) >= back
        assert row[ends[-back]] == target and distance == length - 1 - ends[-back]
        # the unfinished sentence and every whole sentence have 0 … max_words / 1 … max_words words
        assert length - 2 - ends[-1] <= max_words
        assert all(1 <= b - a - 1 <= max_words for a, b in zip(ends, ends[1:]))
        assert ends[0] <= max_words  # only the first sentence is cut
    again = ct.make_batch(batch, length, torch.Generator().manual_seed(seed), back=back, max_words=max_words)
    assert all(torch.equal(a, b) for a, b in zip((inputs, targets, distances), again))


def test_the_distance_in_tokens_varies_and_every_mark_is_a_target():
    _, targets, distances = ct.make_batch(2000, 32, torch.Generator().manual_seed(0))
    assert set(targets.tolist()) == MARKS
    # the query, an unfinished sentence of 0 … 5 words, then 2 sentences of 2 … 6 tokens: 5 … 18
    assert set(distances.tolist()) == set(range(5, 19))


def test_make_batch_snapshot():
    """Frozen values for seed 0 (any change of the draws changes every experiment's data)."""
    inputs, targets, distances = ct.make_batch(2, 24, torch.Generator().manual_seed(0))
    assert distances.tolist() == [11, 10]
    assert [chr(t) for t in targets.tolist()] == ["!", "!"]
    rows = [bytes(row).decode() for row in inputs[:, :-1].tolist()]
    assert rows == ["e;na.th?rdbg!tsqqi.n!tl", "e!jj!ab.dapfc!li!dqjl!d"]


def test_make_batch_rejects_bad_arguments():
    g = torch.Generator().manual_seed(0)
    assert ct.min_length(3, 5) == 24
    with pytest.raises(ValueError, match=r"length must be >= 24 to hold 3 sentences of up to 5 words"):
        ct.make_batch(2, 23, g)
    with pytest.raises(TypeError, match="length must be an int"):
        ct.make_batch(2, 24.0, g)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ct.make_batch(0, 24, g)
    with pytest.raises(ValueError, match="back must be an int >= 1"):
        ct.make_batch(2, 24, g, back=0)
    with pytest.raises(ValueError, match="max_words must be an int >= 1"):
        ct.make_batch(2, 24, g, max_words=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ct.make_batch(2, 24, 0)


# ------------------------------------------------------------------------------------ training and evaluation


def test_training_lowers_the_loss_and_is_deterministic():
    a, history = ct.train_counting(
        "cope", **_micro(), back=2, max_words=2, device="cpu", log_every=4, return_history=True
    )
    b = ct.train_counting("cope", **_micro(), back=2, max_words=2, device="cpu")
    assert [s for s, _ in history] == [4, 8, 12]
    assert history[-1][1] < history[0][1]
    assert not a.training and a.max_positions == 12
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = ct.train_counting("cope", **{**_micro(), "seed": 1}, back=2, max_words=2, device="cpu")
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)


def test_train_counting_rejects_bad_arguments():
    with pytest.raises(ValueError, match="encoding must be one of"):
        ct.train_counting("unknown_pe", **_micro())
    with pytest.raises(ValueError, match=r"train_len must be >= 24 \(back=3, max_words=5\), got 12"):
        ct.train_counting("rope", **_micro())
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        ct.train_counting("rope", **{**_micro(), "lr": 0.0}, back=2, max_words=2)


def test_evaluate_counting_uses_the_same_sequences(device):
    model = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=12).to(device)
    records = ct.evaluate_counting(model, [12, 24], n=10, seed=3, back=2, max_words=2, batch_size=3)
    assert [(r["length"], r["n"]) for r in records] == [(12, 10), (24, 10)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in records)
    again = ct.evaluate_counting(model, [24], n=10, seed=3, back=2, max_words=2, batch_size=10)
    assert again[0]["accuracy"] == records[1]["accuracy"]
    assert again[0]["loss"] == pytest.approx(records[1]["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        ct.evaluate_counting(model, [12], n=0, seed=0, back=2, max_words=2)
    with pytest.raises(TypeError, match="lengths must be a non-empty sequence"):
        ct.evaluate_counting(model, 12, n=1, seed=0, back=2, max_words=2)


def test_evaluate_counting_scores_a_perfect_and_a_constant_model():
    class Oracle(torch.nn.Module):
        """Logits that put the answer (read from the inputs) first, or always '.'."""

        def __init__(self, cheat):
            super().__init__()
            self.cheat, self.w = cheat, torch.nn.Parameter(torch.zeros(()))

        def forward(self, tokens):
            logits = torch.zeros(*tokens.shape, ct.VOCAB_SIZE)
            for row, seq in enumerate(tokens.tolist()):
                ends = [t for t in seq if t in MARKS]
                logits[row, -1, ends[-2] if self.cheat else ord(".")] = 10.0
            return logits

    assert ct.evaluate_counting(Oracle(True), [12], n=40, seed=0, back=2, max_words=2)[0]["accuracy"] == 1.0
    constant = ct.evaluate_counting(Oracle(False), [12], n=400, seed=0, back=2, max_words=2)[0]["accuracy"]
    assert 0.15 < constant < 0.35  # chance: 1 in 4


def test_query_gates_are_the_sigmoid_of_the_scaled_scores():
    torch.manual_seed(0)
    model = build_model("cope", dim=16, n_layers=2, n_heads=2, max_positions=12, seed=0).double()
    tokens = ct.make_batch(3, 12, torch.Generator().manual_seed(1), back=2, max_words=2)[0]
    gates = ct.query_gates(model, tokens, layer=1)
    assert gates.shape == (3, 2, 12)
    # by hand: the input of layer 1, its projections, the last query against every key
    with torch.no_grad():
        x = model.token_embedding(tokens).double()
        x = model.blocks[0](x)
        attn = model.blocks[1].attn
        q, k, _ = attn.qkv(model.blocks[1].attn_norm(x)).view(3, 12, 3, 2, 8).unbind(2)
        expected = torch.sigmoid(torch.einsum("bhd,bnhd->bhn", q[:, -1], k) / 8**0.5)
    assert torch.allclose(gates, expected, atol=1e-12)
    with pytest.raises(ValueError, match="needs a CoPE model, got encoding 'rope'"):
        ct.query_gates(build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=12), tokens)
    with pytest.raises(ValueError, match="layer must be < 2"):
        ct.query_gates(model, tokens, layer=2)


# ------------------------------------------------------------------------------------ runs and results files


@pytest.fixture(scope="module")
def micro_run():
    return ct.run("micro", device="cpu")


def test_micro_run_results(micro_run):
    ct.validate_results(micro_run)
    assert json.loads(json.dumps(micro_run)) == micro_run  # JSON-ready
    assert micro_run["schema"] == ct.SCHEMA and micro_run["preset"] == "micro" and micro_run["device"] == "cpu"
    assert micro_run["encodings"] == ["cope", "rope"] and micro_run["seeds"] == [0]
    assert "encodings" not in micro_run["config"] and micro_run["config"]["steps"] == 10
    assert micro_run["torch_threads"] == torch.get_num_threads() and micro_run["wall_time_s"] > 0
    record = micro_run["results"]["cope"]["0"]
    assert [e["length"] for e in record["eval"]] == [12, 24] and [s for s, _ in record["history"]] == [5, 10]
    alone = ct.run("micro", encodings=["rope"], device="cpu")  # a run alone equals it run with others
    timed = ("train_time_s", "eval_time_s")
    ours, theirs = alone["results"]["rope"]["0"], micro_run["results"]["rope"]["0"]
    assert {k: v for k, v in ours.items() if k not in timed} == {k: v for k, v in theirs.items() if k not in timed}


def test_summary_and_compare(micro_run):
    results = json.loads(json.dumps(micro_run))
    results["seeds"] = [0, 1]
    for name, accuracies in (("cope", (0.9, 1.0)), ("rope", (0.5, 0.7))):
        record = results["results"][name]["0"]
        results["results"][name] = {
            str(s): {**record, "eval": [{**e, "accuracy": a} for e in record["eval"]]} for s, a in enumerate(accuracies)
        }
    assert ct.summary(results)["cope"] == pytest.approx((0.95, 0.9, 1.0, 2))
    assert ct.compare(results, "cope", "rope") == ">" and ct.compare(results, "rope", "cope", 2) == "<"
    results["results"]["rope"]["1"]["eval"][0]["accuracy"] = 0.95
    assert ct.compare(results, "cope", "rope", 1) == "~" and ct.compare(results, "cope", "rope", 2) == ">"
    with pytest.raises(ValueError, match="multiple must be one of"):
        ct.summary(results, 4)
    with pytest.raises(ValueError, match="encoding 'alibi' is not in the results"):
        ct.compare(results, "cope", "alibi")


def test_validate_results_names_the_problem(micro_run):
    with pytest.raises(ValueError, match="schema must be"):
        ct.validate_results({**micro_run, "schema": "pebook.retrieval/1"})
    broken = json.loads(json.dumps(micro_run))
    broken["results"]["rope"]["0"]["eval"].pop()
    with pytest.raises(ValueError, match="rope seed 0: eval lengths"):
        ct.validate_results(broken)
    with pytest.raises(ValueError, match="missing 'torch_threads'"):
        ct.validate_results({k: v for k, v in micro_run.items() if k != "torch_threads"})


def test_preset_config_rejects_bad_arguments():
    assert ct.preset_config("chapter")["encodings"] == ("cope", "rope", "alibi")
    with pytest.raises(ValueError, match="preset must be one of"):
        ct.preset_config("huge")
    with pytest.raises(ValueError, match="unknown hyper-parameter 'stepz'"):
        ct.preset_config("micro", stepz=3)
    with pytest.raises(ValueError, match=r"encodings must be among \(.*\), got 'unknown_pe'"):
        ct.run("micro", encodings=["unknown_pe"])
    with pytest.raises(ValueError, match="seeds must not repeat"):
        ct.run("micro", seeds=[0, 0])
    with pytest.raises(ValueError, match="eval_multiples must increase and start at 1"):
        ct.preset_config("micro", eval_multiples=(2, 4))
    with pytest.raises(ValueError, match=r"train_len must be >= 24 \(back=3, max_words=5\), got 12"):
        ct.preset_config("micro", back=3, max_words=5)


def test_main_writes_results(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert ct.main(["--preset", "micro", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    ct.validate_results(json.loads(out.read_text()))
    printed = capsys.readouterr().out
    assert "cope" in printed and str(out) in printed
    with pytest.raises(SystemExit):
        ct.main(["--preset", "micro", "--encodings", "unknown_pe", "--out", str(out)])
    assert "encodings must be among" in capsys.readouterr().err


def test_committed_chapter_results_match_the_preset():
    results = ct.load_results()
    assert results["preset"] == "chapter" and results["seeds"] == [0, 1, 2]
    assert results["encodings"] == ["cope", "rope", "alibi"]
    assert results["config"] == ct._hyper_parameters(ct.preset_config("chapter"))
    assert results["device"] == "cpu" and results["torch_threads"] == 1 and results["wall_time_s"] > 0
