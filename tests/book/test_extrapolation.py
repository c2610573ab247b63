"""pebook.book.experiments.extrapolation: the length-extrapolation experiment, and the committed
full-run results."""

from __future__ import annotations

import json

import pytest
import torch

from pebook.book.experiments import extrapolation as ex
from pebook.book.training import build_model


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


def test_presets_pin_their_encodings(monkeypatch):
    """Registering a new encoding changes no preset (the committed full run stays valid), and
    a preset accepts any registered encoding."""
    from pebook import registry

    monkeypatch.setitem(registry.ENCODINGS, "xpos", registry.ENCODINGS["rope"])  # a new encoding
    seven = ("none", "sinusoidal", "learned", "shaw", "t5", "rope", "alibi")
    assert ex.preset_config("full")["encodings"] == ex.preset_config("chapter")["encodings"] == seven
    assert ex.load_results()["config"] == json.loads(json.dumps(ex.preset_config("full")))
    assert ex.preset_config("micro", encodings=("xpos",))["encodings"] == ("xpos",)
    monkeypatch.delitem(registry.ENCODINGS, "xpos")
    with pytest.raises(ValueError, match=r"encodings must be among \('none', .*\), got 'xpos'"):
        ex.preset_config("micro", encodings=("xpos",))


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
