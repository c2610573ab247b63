"""pebook.book.experiments.context_extension: every rule × s, fine-tuning, control, dynamic, retrieval."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pebook.book.evaluation import score_tokens
from pebook.book.experiments import context_extension as ce
from pebook.book.experiments import length_extrapolation as le
from pebook.book.experiments._records import jsonable
from pebook.book.training import build_model
from pebook.rope_scaling import per_length_frequencies, rope_scaling_frequencies


@pytest.fixture(scope="module")
def micro():
    return ce.run("micro", device="cpu")


def test_micro_run_holds_every_rule_factor_and_control(micro):
    ce.validate_results(micro)
    config = micro["config"]
    assert micro["schema"] == ce.SCHEMA and set(micro["runs"]) == {"0", "1"}
    assert micro["versions"]["torch"] and micro["device"] == "cpu" and micro["wall_time_s"] > 0
    back = json.loads(json.dumps(micro))
    assert back == micro
    ce.validate_results(back)
    L = config["train_len"]
    for record in micro["runs"].values():
        assert list(record["extensions"]) == list(ce.DEFAULT_RULES)
        control = record["control"]
        assert set(control["lengths"]) == {str(L)} | {str(L * s) for s in config["factors"]}
        assert control["finetune_history"] and set(control["retrieval"]) == {"1", "2", "4", "8"}
        for spec, by_factor in record["extensions"].items():
            assert sorted(by_factor, key=int) == ["2", "4", "8"]
            for s, pair in by_factor.items():
                for key, e in pair.items():
                    assert e["finetuned"] == (key == "finetuned")
                    assert ("finetune_history" in e) == e["finetuned"]
                    assert e["length"] == L * int(s) and e["short"]["length"] == L
                    base_short = record["base"]["lengths"][str(L)]["nonoverlapping"]
                    assert math.isclose(e["short"]["delta_nonoverlapping"], e["short"]["nonoverlapping"] - base_short)
                    dynamic = spec.partition(":")[0] in ce.DYNAMIC_RULES
                    assert (e["dynamic"] is not None) == dynamic
                    if dynamic:
                        assert e["dynamic"]["protocol"] == "dynamic"
                        assert e["dynamic"]["tokens"] == e["dynamic"]["windows"] * e["length"]
                    assert e["retrieval"]["length"] == 8 * int(s)  # the retrieval micro preset: L_r = 8
    # seeds change the model
    one, two = (micro["runs"][s]["base"]["lengths"][str(L)]["nonoverlapping"] for s in ("0", "1"))
    assert one != two


def test_default_without_finetune_is_the_base_model(micro):
    for record in micro["runs"].values():
        for s, pair in record["extensions"]["default"].items():
            e = pair["no_finetune"]
            base = record["base"]["lengths"][str(e["length"])]
            assert e["nonoverlapping"] == base["nonoverlapping"] and e["sliding"] == base["sliding"]
            assert e["short"]["delta_nonoverlapping"] == 0.0 and e["short"]["delta_sliding"] == 0.0
            assert e["retrieval"] == record["base"]["retrieval"][s] and e["length"] == 8 * int(s)
    # and the base record is the model scored directly, on the same tokens
    config = ce.preset_config("micro")
    model, _ = le.train_model("rope", config, 0, device="cpu")
    tokens = le.scored_tokens(config)
    direct = score_tokens(model, tokens, 16, batch_size=config["eval_batch"]).mean()
    assert micro["runs"]["0"]["base"]["lengths"]["16"]["nonoverlapping"] == direct


def test_yarn_without_temperature_differs_only_in_the_attention_factor(micro):
    for s in (2, 4, 8):
        with_t = ce.rule_frequencies("yarn", s, 64, 16)
        without = ce.rule_frequencies("yarn:attention_factor=1", s, 64, 16)
        assert torch.equal(with_t[0], without[0])
        assert with_t[1] == pytest.approx(0.1 * math.log(s) + 1) and without[1] == 1.0
        hf = rope_scaling_frequencies("yarn", 16, factor=s, original_max_positions=64, ramp="transformers")
        assert torch.equal(hf[0], with_t[0]) and hf[1] == with_t[1]
        record = micro["runs"]["0"]["extensions"]
        assert record["yarn"][str(s)]["no_finetune"]["attention_factor"] == pytest.approx(0.1 * math.log(s) + 1)
        assert record["yarn:attention_factor=1"][str(s)]["no_finetune"]["attention_factor"] == 1.0
        assert record["yarn"][str(s)]["no_finetune"]["options"] == {"ramp": "transformers"}


def test_ntk_with_twice_the_factor():
    for s in (2, 4, 8):
        doubled = ce.rule_frequencies("ntk:factor_multiplier=2", s, 64, 16)
        assert torch.equal(doubled[0], ce.rule_frequencies("ntk", 2 * s, 64, 16)[0])
        assert torch.equal(doubled[0], rope_scaling_frequencies("ntk", 16, factor=2.0 * s)[0])
        assert not torch.equal(doubled[0], ce.rule_frequencies("ntk", s, 64, 16)[0])


def test_dynamic_evaluation_with_a_constant_schedule_is_the_static_one():
    model = build_model("rope", dim=16, n_layers=2, n_heads=2, max_positions=8, seed=3).double().eval()
    inv_freq, factor = rope_scaling_frequencies("linear", 8, factor=2.0, dtype=torch.float64)
    model.set_rope_frequencies(inv_freq, factor)
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    windows = ce._windows(tokens, 16, 3)
    schedule = per_length_frequencies("linear", 8, factor=2.0, dtype=torch.float64)
    dynamic = ce.dynamic_scores(model, windows, schedule)
    static = ce.static_scores(model, windows)
    assert dynamic.shape == static.shape == (3, 16)
    assert torch.allclose(dynamic, static, rtol=0, atol=1e-10)
    # a length-dependent schedule does change the losses
    growing = per_length_frequencies("dynamic_ntk", 8, original_max_positions=8, dtype=torch.float64)
    assert not torch.allclose(ce.dynamic_scores(model, windows, growing), static, atol=1e-6)


def test_dynamic_records_compare_with_static_on_the_same_windows(micro):
    e = micro["runs"]["0"]["extensions"]["dynamic_ntk"]["2"]["no_finetune"]
    assert e["dynamic"]["loss"] != e["dynamic"]["static_loss"]
    assert math.isfinite(e["dynamic"]["loss"])


def test_summary_and_compare(micro):
    table = ce.summary(micro)
    assert set(table) == set(ce.DEFAULT_RULES)
    mean, low, high, n = table["linear"][2]
    assert low <= mean <= high and n == 2
    fine = ce.summary(micro, finetuned=True)
    assert "control" in fine and fine["control"][4][3] == 2
    assert "control" not in table
    dynamic = ce.summary(micro, "dynamic")
    assert dynamic["linear"][2] is None and dynamic["dynamic"][2][3] == 2
    assert ce.summary(micro, "retrieval_accuracy")["yarn"][8][3] == 2
    assert ce.summary(micro, "short_delta_sliding")["default"][2] == (0.0, 0.0, 0.0, 2)
    assert ce.compare(micro, "linear", "linear", 2) == "~"
    assert ce.compare(micro, "control", "default", 2, finetuned=True) in ("<", ">", "~")
    with pytest.raises(ValueError, match="metric must be one of"):
        ce.summary(micro, "perplexity")
    with pytest.raises(ValueError, match="not in the results"):
        ce.compare(micro, "linear", "nope", 2)
    with pytest.raises(ValueError, match="factor must be one of"):
        ce.compare(micro, "linear", "ntk", 3)
    with pytest.raises(ValueError, match="has no dynamic"):
        ce.compare(micro, "linear", "dynamic", 2, "dynamic")


def test_compare_orders_only_separated_ranges(micro):
    fake = json.loads(json.dumps(micro))
    for i, record in enumerate(fake["runs"].values()):
        record["extensions"]["linear"]["2"]["no_finetune"]["nonoverlapping"] = 1.0 + 0.1 * i
        record["extensions"]["ntk"]["2"]["no_finetune"]["nonoverlapping"] = 2.0 + 0.1 * i
        record["extensions"]["yarn"]["2"]["no_finetune"]["nonoverlapping"] = 1.05 + 0.1 * i
    assert ce.compare(fake, "linear", "ntk", 2) == "<"
    assert ce.compare(fake, "ntk", "linear", 2) == ">"
    assert ce.compare(fake, "linear", "yarn", 2) == "~"


def test_paired_difference_and_paired_compare(micro):
    """Paired: a seed offset common to both rules cancels; only the per-seed difference counts."""
    fake = json.loads(json.dumps(micro))
    for i, record in enumerate(fake["runs"].values()):
        offset = 1.0 * i  # the seeds' base models differ a lot ...
        record["extensions"]["linear"]["2"]["no_finetune"]["nonoverlapping"] = 2.0 + offset
        record["extensions"]["ntk"]["2"]["no_finetune"]["nonoverlapping"] = 2.1 + offset  # ... ntk always 0.1 worse
        record["extensions"]["yarn"]["2"]["no_finetune"]["nonoverlapping"] = 2.0 + offset + (0.05 if i else -0.05)
        record["control"]["lengths"][str(2 * fake["config"]["train_len"])]["nonoverlapping"] = 5.0 + offset
        record["extensions"]["linear"]["2"]["finetuned"]["nonoverlapping"] = 4.0 + offset
    mean, low, high, n = ce.paired_difference(fake, "linear", "ntk", 2)
    assert (round(mean, 12), round(low, 12), round(high, 12), n) == (-0.1, -0.1, -0.1, 2)
    assert ce.compare(fake, "linear", "ntk", 2) == "~"  # unpaired: the ranges overlap
    assert ce.compare(fake, "linear", "ntk", 2, paired=True) == "<"
    assert ce.compare(fake, "ntk", "linear", 2, paired=True) == ">"
    assert ce.compare(fake, "linear", "yarn", 2, paired=True) == "~"  # the sign changes between seeds
    assert ce.compare(fake, "linear", "control", 2, finetuned=True, paired=True) == "<"
    mean, low, high, n = ce.paired_difference(fake, "control", "linear", 2, finetuned=True)
    assert math.isclose(mean, 1.0) and n == 2
    with pytest.raises(ValueError, match="not in the results"):
        ce.paired_difference(fake, "linear", "control", 2)  # the control is fine-tuned only
    with pytest.raises(ValueError, match="has no dynamic"):
        ce.compare(fake, "linear", "dynamic", 2, "dynamic", paired=True)
    with pytest.raises(TypeError, match="paired must be a bool, got 'yes'"):
        ce.compare(fake, "linear", "ntk", 2, paired="yes")


def test_committed_chapter_results():
    """The results the chapter reads: the chapter preset, three seeds, every default rule and the paper's YaRN."""
    results = ce.load_results()
    assert results["preset"] == "chapter" and results["config"] == jsonable(ce.preset_config("chapter"))
    assert set(results["runs"]) == {"0", "1", "2"}
    for record in results["runs"].values():
        assert set(record["extensions"]) == set(ce.DEFAULT_RULES) | {"yarn_paper"}
        assert record["torch_threads"] == 1 and record["device"] == "cpu"
    yarn = results["runs"]["0"]["extensions"]["yarn"]["4"]["no_finetune"]
    assert yarn["options"] == {"ramp": "transformers"}
    assert yarn["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1)
    # frozen snapshot: plain RoPE of seed 0 at 4 L, without fine-tuning (the chapter's live run repeats it)
    default = results["runs"]["0"]["extensions"]["default"]["4"]["no_finetune"]
    assert default["nonoverlapping"] == pytest.approx(2.1450, abs=5e-5)
    assert default["nonoverlapping"] == results["runs"]["0"]["base"]["lengths"]["256"]["nonoverlapping"]


def test_rule_schedule_is_the_rule_at_every_length():
    schedule = ce.rule_schedule("dynamic", 4, 16, 8)
    for seq_len in (1, 16, 17, 64, 100):
        inv_freq, attention = schedule(seq_len)
        expected = rope_scaling_frequencies("dynamic", 8, factor=4.0, original_max_positions=16, seq_len=seq_len)
        assert torch.equal(inv_freq, expected[0]) and attention == expected[1]
    doubled = ce.rule_schedule("dynamic_ntk:factor_multiplier=2", 4, 16, 8)(64)[0]
    assert torch.equal(doubled, rope_scaling_frequencies("dynamic_ntk", 8, original_max_positions=16, seq_len=64)[0])


def test_merge_results(micro):
    one = json.loads(json.dumps(micro))
    del one["runs"]["1"]
    two = json.loads(json.dumps(micro))
    del two["runs"]["0"]
    for record in two["runs"].values():
        record["extensions"] = {"linear": record["extensions"]["linear"]}
    merged = ce.merge_results(one, two)
    assert set(merged["runs"]) == {"0", "1"} and list(merged["runs"]["1"]["extensions"]) == ["linear"]
    assert merged["wall_time_s"] == one["wall_time_s"] + two["wall_time_s"]
    early, late = dict(one, started="2026-01-01T00:00:00+00:00"), dict(two, finished="2027-01-01T00:00:00+00:00")
    span = ce.merge_results(late, early)
    assert (span["started"], span["finished"]) == (early["started"], late["finished"])
    assert ce.summary(merged)["linear"][2][3] == 2 and ce.summary(merged)["ntk"][2][3] == 1
    again = ce.merge_results(merged, one)
    for key in ("base", "control", "extensions"):
        assert again["runs"]["0"][key] == one["runs"]["0"][key]
    assert again["runs"]["0"]["wall_time_s"] == 2 * one["runs"]["0"]["wall_time_s"]  # the time spent, summed
    other = json.loads(json.dumps(two))
    other["config"]["finetune_steps"] = 99
    with pytest.raises(ValueError, match="cannot merge"):
        ce.merge_results(one, other)
    broken = json.loads(json.dumps(one))
    broken["schema"] = "x"
    with pytest.raises(ValueError, match="schema"):
        ce.merge_results(broken, two)
    missing = json.loads(json.dumps(one))
    del missing["runs"]["0"]["extensions"]["linear"]["2"]["finetuned"]
    with pytest.raises(ValueError, match="with and without fine-tuning"):
        ce.validate_results(missing)


def test_run_dir_resumes_and_the_command_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    out = tmp_path / "out.json"
    args = ["--preset", "micro", "--seeds", "1", "--rules", "default,dynamic", "--device", "cpu", "--no-progress"]
    assert ce.main([*args, "--run-dir", str(run_dir), "--out", str(out)]) == 0
    assert "dynamic" in capsys.readouterr().out
    first = json.loads(out.read_text())
    assert (run_dir / "seed1" / "base_lm.pt").exists() and (run_dir / "seed1" / "dynamic.s8.json").exists()
    again = ce.run("micro", seeds=(1,), rules=("default", "dynamic"), device="cpu", run_dir=run_dir)
    for key in ("base", "control", "extensions"):
        assert again["runs"]["1"][key] == first["runs"]["1"][key]
    # a finished record is read back from the run directory, not recomputed
    done = run_dir / "seed1" / "default.s2.json"
    record = json.loads(done.read_text())
    record["no_finetune"]["nonoverlapping"] = 123.0
    done.write_text(json.dumps(record))
    resumed = ce.run("micro", seeds=(1,), rules=("default",), device="cpu", run_dir=run_dir)
    assert resumed["runs"]["1"]["extensions"]["default"]["2"]["no_finetune"]["nonoverlapping"] == 123.0
    merged_file = tmp_path / "merged.json"
    args = ["--preset", "micro", "--seeds", "1", "--rules", "ntk;ntk:factor_multiplier=2", "--device", "cpu"]
    ce.main([*args, "--run-dir", str(run_dir), "--merge-into", str(out), "--out", str(merged_file), "--no-progress"])
    merged = json.loads(out.read_text())
    assert list(merged["runs"]["1"]["extensions"]) == ["default", "dynamic", "ntk", "ntk:factor_multiplier=2"]
    with pytest.raises(ValueError, match="other hyper-parameters"):
        ce.run("micro", seeds=(1,), rules=("default",), device="cpu", run_dir=run_dir, finetune_steps=3)


def test_bad_inputs_name_the_argument():
    assert ce.preset_config("chapter")["seeds"] == (0, 1, 2)
    assert ce.preset_config("full")["finetune_steps"] == 600
    with pytest.raises(ValueError, match="preset must be one of"):
        ce.preset_config("huge")
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        ce.preset_config("micro", stepz=3)
    with pytest.raises(ValueError, match="rule must be one of"):
        ce.parse_rule("rotate")
    with pytest.raises(ValueError, match="rule must be one of"):
        ce.parse_rule("longrope")
    with pytest.raises(ValueError, match="option=value"):
        ce.parse_rule("ntk:factor_multiplier")
    with pytest.raises(ValueError, match="set by the experiment"):
        ce.parse_rule("ntk:factor=4")
    with pytest.raises(ValueError, match="factor_multiplier"):
        ce.parse_rule("ntk:factor_multiplier=0.5")
    with pytest.raises(ValueError, match="rules: bad rule 'yarn:beta=3'"):
        ce.preset_config("micro", rules=("yarn:beta=3",))
    with pytest.raises(ValueError, match="new_base"):
        ce.preset_config("micro", rules=("base",))
    with pytest.raises(ValueError, match="rules must not repeat"):
        ce.preset_config("micro", rules=("ntk", "ntk"))
    with pytest.raises(ValueError, match="rules must be a non-empty"):
        ce.run("micro", rules=())
    with pytest.raises(ValueError, match="factors must be"):
        ce.preset_config("micro", factors=(4, 2))
    with pytest.raises(ValueError, match="factors must be"):
        ce.preset_config("micro", factors=(1, 2))
    with pytest.raises(ValueError, match="factors must be a sequence"):
        ce.preset_config("micro", factors="248")
    with pytest.raises(ValueError, match="batch_size"):
        ce.preset_config("micro", batch_size=6)
    with pytest.raises(ValueError, match="seeds"):
        ce.preset_config("micro", seeds=(-1,))
    with pytest.raises(ValueError, match="seeds"):
        ce.run("micro", seeds=(0, 0))
    with pytest.raises(ValueError, match="eval_bytes"):
        ce.preset_config("micro", eval_bytes=10)
    with pytest.raises(ValueError, match="finetune_steps"):
        ce.preset_config("micro", finetune_steps=0)
    with pytest.raises(ValueError, match="retrieval_preset"):
        ce.preset_config("micro", retrieval_preset="huge")
    with pytest.raises(ValueError, match="RoPE"):
        ce._rope_dim(build_model("alibi", dim=16, n_layers=1, n_heads=2, max_positions=8))
