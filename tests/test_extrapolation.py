"""The corpus, the training loop and the length-extrapolation experiment (pebook.corpus,
pebook.training, pebook.experiments.extrapolation), and the committed full-run results."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pebook import corpus
from pebook.experiments import extrapolation as ex
from pebook.training import (
    TrainConfig,
    build_model,
    evaluate_length,
    learning_rate,
    loss_by_bucket,
    per_position_loss,
    train,
)

# ------------------------------------------------------------------------------------ corpus


def test_corpus_is_the_stated_text():
    text = corpus.load_text()
    assert len(text) == 4_152_016
    assert len(set(text)) == 73 and text.isascii()
    chapters = corpus.chapters()
    assert len(chapters) == 1189  # the KJV's chapter count
    assert chapters[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert chapters[-1].startswith("Revelation 22\n")
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_split_is_deterministic_disjoint_and_every_tenth_chapter():
    train_text, heldout_text = corpus.split_text()
    assert (train_text, heldout_text) == corpus.split_text()
    headings = lambda text: [c.split("\n", 1)[0] for c in corpus.chapters(text)]  # noqa: E731
    all_headings = headings(corpus.load_text())
    train_h, held_h = headings(train_text), headings(heldout_text)
    assert len(set(all_headings)) == 1189
    assert held_h == all_headings[9::10] and len(held_h) == 118
    assert set(train_h).isdisjoint(held_h) and len(train_h) + len(held_h) == 1189
    assert corpus.corpus_tokens("train").numel() == 3_751_682
    assert corpus.corpus_tokens("heldout").numel() == 400_334
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.corpus_tokens("test")
    with pytest.raises(ValueError, match="held_out_every"):
        corpus.split_text(1)


def test_tokenisation_round_trip_and_errors():
    text = corpus.chapters()[0][:500]
    tokens = corpus.encode(text)
    assert tokens.dtype == torch.long and tokens.shape == (500,)
    assert tokens.tolist() == list(text.encode("ascii"))
    assert corpus.decode(tokens) == text
    assert corpus.encode("").numel() == 0
    with pytest.raises(ValueError, match="ASCII"):
        corpus.encode("naïve")
    with pytest.raises(TypeError, match="text must be a str"):
        corpus.encode(b"bytes")
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        corpus.decode(torch.tensor([65, 200]))


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=50))
def test_tokenisation_round_trip_property(text):
    assert corpus.decode(corpus.encode(text)) == text


def test_random_windows_shapes_shift_and_determinism():
    tokens = corpus.corpus_tokens("train")
    x1, y1 = corpus.random_windows(tokens, 5, 32, torch.Generator().manual_seed(3))
    x2, y2 = corpus.random_windows(tokens, 5, 32, torch.Generator().manual_seed(3))
    assert x1.shape == y1.shape == (5, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    with pytest.raises(TypeError, match="generator"):
        corpus.random_windows(tokens, 5, 32, 3)
    with pytest.raises(ValueError, match="fewer than length"):
        corpus.random_windows(tokens[:10], 1, 10, torch.Generator())


def test_eval_windows_score_the_same_tokens_at_every_length():
    tokens = corpus.corpus_tokens("heldout")
    targets = {}
    for length in (8, 16, 64):
        x, y = corpus.eval_windows(tokens, length, 256, n_spans=4)
        assert x.shape == y.shape == (256 // length, length)
        targets[length] = y.flatten()
    assert torch.equal(targets[8], targets[16]) and torch.equal(targets[8], targets[64])
    x, y = corpus.eval_windows(tokens, 64, 256, n_spans=4)
    assert torch.equal(x[0], tokens[:64]) and torch.equal(y[0], tokens[1:65])
    stride = (tokens.numel() - 1 - 64) // 3
    assert torch.equal(x[3], tokens[3 * stride : 3 * stride + 64])  # the spans spread over the text
    with pytest.raises(ValueError, match="multiple of length"):
        corpus.eval_windows(tokens, 48, 256, n_spans=4)
    with pytest.raises(ValueError, match="multiple of n_spans"):
        corpus.eval_windows(tokens, 8, 100, n_spans=3)
    with pytest.raises(ValueError, match="too few"):
        corpus.eval_windows(tokens[:90], 8, 96, n_spans=4)


@given(st.sampled_from([1, 2, 4, 8, 16, 32]), st.integers(1, 4))
def test_eval_windows_property(length, n_spans):
    tokens = torch.arange(1000)
    x, y = corpus.eval_windows(tokens, length, 32 * n_spans, n_spans=n_spans)
    assert torch.equal(y, x + 1)  # contiguous windows: target = next token
    assert x.numel() == 32 * n_spans


# ------------------------------------------------------------------------------------ training


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, batch_size=1, seq_len=4, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1) and learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert learning_rate(100, cfg) == pytest.approx(0.1) and learning_rate(500, cfg) == pytest.approx(0.1)
    const = TrainConfig(steps=100, batch_size=1, seq_len=4, lr=0.5, warmup_steps=4, schedule="constant")
    assert [learning_rate(s, const) for s in (0, 3, 4, 99)] == [0.125, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(steps=1, batch_size=1, seq_len=1, schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(steps=1, batch_size=1, seq_len=1, min_lr_ratio=2.0)


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=8, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=8, seed=1)
    c = build_model("rope", dim=16, n_layers=1, n_heads=2, max_positions=8, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)


def test_training_lowers_the_loss_and_per_position_loss_matches_cross_entropy(device):
    tokens = corpus.corpus_tokens("train")[:20_000]
    model = build_model("alibi", dim=16, n_layers=1, n_heads=2, max_positions=16).to(device)
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=3, log_every=10)
    state = train(model, tokens, cfg, device=device)
    assert state.step == 30 and [s for s, _ in state.history] == [10, 20, 30]
    assert state.history[-1][1] < state.history[0][1] < math.log(256) + 0.5
    x, y = corpus.eval_windows(tokens, 16, 64, n_spans=2)
    per_pos = per_position_loss(model, x, y, batch_size=3)
    assert per_pos.dtype == torch.float64 and per_pos.shape == (16,)
    with torch.no_grad():
        logits = model(x.to(device))
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), y.to(device).flatten())
    assert float(per_pos.mean()) == pytest.approx(float(full), rel=1e-5)


def test_interrupted_training_resumes_to_the_same_state():
    tokens = corpus.corpus_tokens("train")[:20_000]
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=8, lr=1e-2, warmup_steps=2, log_every=3)
    make = lambda: build_model("t5", dim=16, n_layers=1, n_heads=2, max_positions=8)  # noqa: E731
    whole = train(make(), tokens, cfg)
    saved = []
    part = train(make(), tokens, cfg, stop_after=5, checkpoint=lambda s: saved.append(s.step), checkpoint_every=2)
    assert part.step == 5 and saved == [2, 4]
    resumed = train(make(), tokens, cfg, state=part)
    assert resumed.step == 8 and resumed.history == whole.history
    assert all(torch.equal(resumed.model[k], whole.model[k]) for k in whole.model)


def test_learned_model_past_its_table_is_refused_not_crashed():
    model = build_model("learned", dim=16, n_layers=1, n_heads=2, max_positions=8)
    heldout = corpus.corpus_tokens("heldout")
    ok = evaluate_length(model, heldout, 8, 32)
    assert set(ok) == {"length", "loss", "ppl", "per_position"} and len(ok["per_position"]) == 8
    refused = evaluate_length(model, heldout, 16, 32)
    assert set(refused) == {"length", "refused"}
    assert "beyond this learned table" in refused["refused"] and "max_positions=8" in refused["refused"]


def test_loss_by_bucket():
    assert loss_by_bucket([1.0, 3.0, 5.0, 7.0, 9.0], 2) == [2.0, 6.0, 9.0]
    with pytest.raises(ValueError, match="bucket"):
        loss_by_bucket([1.0], 0)
    with pytest.raises(ValueError, match="non-empty"):
        loss_by_bucket([], 2)


# ------------------------------------------------------------------------------------ the experiment


def test_preset_config_checks():
    assert ex.preset_config("full")["eval_multiples"] == (1, 2, 4, 8, 16)
    assert ex.preset_config("chapter", steps=5)["steps"] == 5
    with pytest.raises(ValueError, match="preset must be one of"):
        ex.preset_config("huge")
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        ex.preset_config("micro", stepz=3)
    with pytest.raises(ValueError, match="encodings must be among"):
        ex.preset_config("micro", encodings=("rope", "xpos"))
    with pytest.raises(ValueError, match="divide"):
        ex.preset_config("micro", eval_multiples=(1, 3, 4))


def test_micro_run_writes_a_valid_results_file(tmp_path):
    results = ex.run("micro", run_dir=tmp_path / "run", device="cpu")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    ex.validate_results(on_disk)
    assert on_disk["preset"] == "micro" and on_disk["device"] == "cpu" and on_disk["seed"] == 0
    assert on_disk["config"]["steps"] == 6 and on_disk["versions"]["torch"] == torch.__version__
    learned = on_disk["encodings"]["learned"]["eval"]
    assert "loss" in learned[0] and all("beyond this learned table" in e["refused"] for e in learned[1:])
    assert len(on_disk["context_extension"]) == 5 * 1 * 2  # rules × factors × (fine-tuned or not)
    default = [r for r in on_disk["context_extension"] if r["rule"] == "default" and not r["finetuned"]]
    rope_2x = on_disk["encodings"]["rope"]["eval"][1]
    assert default[0]["loss"] == pytest.approx(rope_2x["loss"], abs=1e-6)  # "default" = plain RoPE
    with pytest.raises(FileExistsError, match="resume"):
        ex.run("micro", run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="other hyper-parameters"):
        ex.run("micro", run_dir=tmp_path / "run", resume=True, steps=7)


def test_interrupted_run_resumes_to_the_uninterrupted_results(tmp_path):
    whole = ex.run("micro", device="cpu", extension=False)
    run_dir = tmp_path / "run"
    assert ex.run("micro", run_dir=run_dir, device="cpu", extension=False, stop_after=4) is None
    assert (run_dir / "rope.ckpt.pt").exists()  # interrupted inside the first encoding
    assert ex.run("micro", run_dir=run_dir, device="cpu", extension=False, resume=True, stop_after=5) is None
    assert (run_dir / "rope.json").exists() and (run_dir / "learned.ckpt.pt").exists()
    resumed = ex.run("micro", run_dir=run_dir, device="cpu", extension=False, resume=True)
    for name in whole["encodings"]:
        for key in ("history", "eval", "buckets"):
            assert resumed["encodings"][name][key] == whole["encodings"][name][key], (name, key)


def test_committed_full_results_are_valid():
    results = ex.load_results()
    assert results["preset"] == "full"
    assert results["config"] == json.loads(json.dumps(ex.preset_config("full")))
    assert results["device_name"] and results["wall_time_s"] > 0
    assert list(results["encodings"]) == list(ex.preset_config("full")["encodings"])
    assert results["context_extension"] is not None
    with pytest.raises(ValueError, match="schema"):
        ex.validate_results({**results, "schema": "other"})


def test_evaluate_encoding_scores_the_same_tokens_for_a_subset_of_lengths():
    config = ex.preset_config("micro")
    model = build_model("alibi", dim=16, n_layers=1, n_heads=2, max_positions=8)
    every = ex.evaluate_encoding(model, config)
    first = ex.evaluate_encoding(model, config, multiples=(1,))
    assert first["eval"] == every["eval"][:1] and "per_position" not in every["eval"][0]
    assert every["buckets"]["length"] == 4 * 8 and len(every["buckets"]["loss"]) == 4
    assert ex.eval_tokens(config) == 2 * 8 * 4


def test_command_line(tmp_path, capsys):
    args = ["--preset", "micro", "--device", "cpu", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert ex.main(args) == 0
    printed = capsys.readouterr().out
    assert "learned" in printed and "ref." in printed
    ex.validate_results(json.loads((tmp_path / "run" / "results.json").read_text()))
    assert ex.main([*args, "--resume", "--out", str(tmp_path / "again.json")]) == 0  # everything done: reuses it
    again = json.loads((tmp_path / "again.json").read_text())
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["encodings"] == first["encodings"] and again["context_extension"] == first["context_extension"]
