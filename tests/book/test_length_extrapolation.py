"""pebook.book.experiments.length_extrapolation: seeds, both protocols, paired analysis, merging."""

from __future__ import annotations

import json

import pytest
import torch

from pebook.book.evaluation import score_tokens
from pebook.book.experiments import length_extrapolation as le
from pebook.book.training import build_model


@pytest.fixture(scope="module")
def micro():
    return le.run("micro", device="cpu")


def test_preset_config_checks():
    assert le.preset_config("full")["seeds"] == (0, 1, 2)
    assert le.preset_config("chapter", steps=5)["steps"] == 5
    with pytest.raises(ValueError, match="preset must be one of"):
        le.preset_config("huge")
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        le.preset_config("micro", stepz=3)
    with pytest.raises(ValueError, match="encodings must be among"):
        le.preset_config("micro", encodings=("rope", "nope"))
    with pytest.raises(ValueError, match="seeds"):
        le.preset_config("micro", seeds=())
    with pytest.raises(ValueError, match="eval_multiples"):
        le.preset_config("micro", eval_multiples=(2, 4))
    with pytest.raises(ValueError, match="long_multiples"):
        le.preset_config("micro", long_multiples=(3,))
    with pytest.raises(ValueError, match="batch_size"):
        le.preset_config("micro", batch_size=3)
    with pytest.raises(ValueError, match="eval_bytes"):
        le.preset_config("micro", eval_bytes=10)


def test_presets_pin_their_encodings():
    seven = ("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi")
    assert le.preset_config("full")["encodings"] == le.preset_config("chapter")["encodings"] == seven


def test_micro_run_records_every_seed_protocol_and_reference(micro):
    le.validate_results(micro)
    assert set(micro["runs"]) == {"rope", "learned"}
    assert set(micro["runs"]["rope"]) == {"0", "1"}
    rope = micro["runs"]["rope"]
    # seeds change the model: different losses
    assert (
        rope["0"]["evaluation"]["lengths"][0]["nonoverlapping"]
        != rope["1"]["evaluation"]["lengths"][0]["nonoverlapping"]
    )
    learned = micro["runs"]["learned"]["0"]["evaluation"]["lengths"]
    assert "nonoverlapping" in learned[0] and all("beyond this learned table" in e["refused"] for e in learned[1:])
    # the reference trained at 2x accepts 2x, even for a learned table
    assert micro["runs"]["learned"]["0"]["long"][0]["length"] == 16
    assert micro["data"]["scored_tokens"] == 400
    assert micro["versions"]["torch"] == torch.__version__ and micro["device"] == "cpu"
    assert json.loads(json.dumps(micro)) == micro


def test_baselines_are_scored_under_the_models_windows(micro):
    from pebook.book import ngram
    from pebook.book.corpus import corpus_tokens
    from pebook.book.evaluation import window_context

    config = micro["config"]
    tokens = le.scored_tokens(config)
    bigram = ngram.fit(corpus_tokens("train"), 2)
    context = window_context(400, 16)
    expected = float(bigram.target_losses(tokens, context).mean())
    assert micro["baselines"]["2"]["nonoverlapping"]["2"] == pytest.approx(expected, rel=1e-12)
    full = float(bigram.log_loss(tokens)[1:].mean())
    assert micro["baselines"]["2"]["full_context"] == pytest.approx(full, rel=1e-12)
    # a unigram has no context to lose: the same loss under every window
    unigram = micro["baselines"]["1"]
    assert len({unigram["full_context"], *unigram["nonoverlapping"].values(), *unigram["sliding"].values()}) == 1


def test_the_evaluation_is_what_score_tokens_gives():
    config = le.preset_config("micro")
    model = build_model("alibi", dim=16, n_layers=1, n_heads=2, max_positions=8)
    tokens = le.scored_tokens(config)
    result = le.evaluate_model(model, config, device="cpu")
    for entry in result["lengths"]:
        plain = score_tokens(model, tokens, entry["length"], batch_size=config["eval_batch"])
        sliding = score_tokens(model, tokens, entry["length"], stride=entry["length"] // 2)
        assert entry["nonoverlapping"] == pytest.approx(plain.mean(), abs=1e-9)
        assert entry["sliding"] == pytest.approx(sliding.mean(), abs=1e-9)
    # paired groups cover every scored token once
    for paired in result["paired"]:
        assert sum(g["n"] for g in paired["groups"]) == tokens.numel() - 1
    assert len(result["by_context"]["loss"]) == 4  # 32 positions in buckets of 8


def test_merging_adds_runs_and_refuses_other_configs(micro):
    more = le.run("micro", encodings=("rope",), seeds=(5,), device="cpu", baselines=False)
    merged = le.merge_results(micro, more)
    assert set(merged["runs"]["rope"]) == {"0", "1", "5"} and set(merged["runs"]["learned"]) == {"0", "1"}
    assert merged["runs"]["rope"]["5"] == more["runs"]["rope"]["5"]
    assert le.summary(merged)["rope"][1][3] == 3  # three seeds
    other = le.run("micro", encodings=("rope",), seeds=(0,), device="cpu", baselines=False, steps=4)
    with pytest.raises(ValueError, match="cannot merge"):
        le.merge_results(micro, other)


def test_summary_is_mean_min_max_over_seeds(micro):
    table = le.summary(micro, "sliding")
    values = [r["evaluation"]["lengths"][0]["sliding"] for r in micro["runs"]["rope"].values()]
    assert table["rope"][1] == pytest.approx((sum(values) / 2, min(values), max(values), 2))
    assert table["learned"][2] is None
    with pytest.raises(ValueError, match="protocol"):
        le.summary(micro, "strided")


def test_run_dir_reuses_finished_runs(tmp_path):
    first = le.run("micro", encodings=("rope",), seeds=(0,), device="cpu", baselines=False, run_dir=tmp_path)
    assert (tmp_path / "rope.0.json").exists()
    again = le.run("micro", encodings=("rope",), seeds=(0,), device="cpu", baselines=False, run_dir=tmp_path)
    assert again["runs"] == first["runs"]
    with pytest.raises(ValueError, match="other hyper-parameters"):
        le.run("micro", encodings=("rope",), seeds=(0,), device="cpu", baselines=False, run_dir=tmp_path, steps=4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="encodings"):
        le.run("micro", encodings=("rope", "bogus"), baselines=False)
    with pytest.raises(ValueError, match="seeds"):
        le.run("micro", seeds=(-1,), baselines=False)
    with pytest.raises(ValueError, match="schema"):
        le.validate_results({"schema": "other"})


def test_encoding_variants_carry_options():
    assert le.parse_variant("rope") == ("rope", {})
    assert le.parse_variant("t5:t5_max_distance=64") == ("t5", {"t5_max_distance": 64})
    assert le.parse_variant("rope:base=500000.5") == ("rope", {"base": 500000.5})
    config = le.preset_config("micro", steps=1, long_multiples=())
    model, _ = le.train_model("t5:t5_max_distance=20", config, 0, device="cpu")
    assert model.encoding_module.relative_bias.max_distance == 20
    with pytest.raises(ValueError, match="encoding must be one of"):
        le.parse_variant("t6:t5_max_distance=1")
    with pytest.raises(ValueError, match="option=value"):
        le.parse_variant("t5:t5_max_distance")
    with pytest.raises(ValueError, match="encodings must be among"):
        le.run("micro", encodings=("t5:t5_max_distance",), baselines=False)
    with pytest.raises(TypeError, match="max_dist"):
        le.train_model("t5:max_dist=3", config, 0, device="cpu")


def test_compare_orders_only_separated_seed_ranges():
    def fake(losses):
        runs = {
            name: {
                str(seed): {"evaluation": {"lengths": [{"multiple": 1, "nonoverlapping": value}]}}
                for seed, value in enumerate(values)
            }
            for name, values in losses.items()
        }
        return {"config": {"eval_multiples": [1]}, "runs": runs}

    results = fake({"a": [1.0, 1.2], "b": [1.3, 1.4], "c": [1.1, 1.5]})
    assert le.compare(results, "a", "b", 1) == "<" and le.compare(results, "b", "a", 1) == ">"
    assert le.compare(results, "a", "c", 1) == "~" and le.compare(results, "b", "c", 1) == "~"
    with pytest.raises(ValueError, match="not in the results"):
        le.compare(results, "a", "z", 1)
    with pytest.raises(ValueError, match="multiple"):
        le.compare(results, "a", "b", 2)


def test_compare_refuses_refused_lengths(micro):
    with pytest.raises(ValueError, match="refused"):
        le.compare(micro, "rope", "learned", 2)


def test_committed_chapter_results_match_the_preset():
    results = le.load_results("length_extrapolation_chapter.json")
    assert results["preset"] == "chapter"
    assert results["config"] == json.loads(json.dumps(le.preset_config("chapter")))
    seven = le.preset_config("chapter")["encodings"]
    assert all(set(results["runs"][name]) == {"0", "1", "2"} for name in seven)
    assert results["device"] and results["device_name"] and results["wall_time_s"] > 0
    assert all(run["device"] for by_seed in results["runs"].values() for run in by_seed.values())
    assert sorted(results["baselines"]) == ["1", "2", "3", "4", "5"]
