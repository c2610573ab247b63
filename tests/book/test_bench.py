"""The benchmark runs end to end and reports what it claims (structure and ratios only, never absolute times).

Most tests run workloads in this process at tiny shapes (``quick``: no compilation) with memory
off; one test goes through the command line and its worker processes, where CPU peak memory is
measured, and checks the JSON file.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import pebook.rope_native
from pebook.book import bench

QUICK = dict(lengths=(16, 32), device="cpu", quick=True, compile_peers=False, repeats=1, memory=False)


@pytest.fixture
def no_subprocess(monkeypatch):
    pebook.rope_native.native_status()  # RoPE's native kernel is found (or built) before, as in a worker

    def refuse(*args, **kwargs):
        raise AssertionError(f"this test must not start a subprocess: {args}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(bench, "MIN_CALL_SECONDS", 0.0)  # one call per round


EXPECTED_ROWS = {
    "alibi": ["floor", "pebook", "pebook", "pebook", "peer", "peer"],
    "t5": ["floor", "pebook", "pebook", "pebook", "peer", "peer"],
    "shaw": ["floor", "pebook", "pebook", "pebook", "peer"],
    "rope_half": ["floor", "pebook", "pebook", "pebook", "peer", "peer", "peer", "peer"],
    "rope_interleaved": ["floor", "pebook", "pebook", "pebook", "peer", "peer"],
    "rope_large": ["floor", "pebook", "pebook", "pebook", "peer", "peer", "peer", "peer"],
    "train": ["floor", "pebook", "peer", "pebook"],
    "decode": ["floor", "pebook", "peer"],
}


@pytest.mark.parametrize("name", list(bench.WORKLOADS))
def test_every_workload_has_its_rows_and_sane_ratios(name, no_subprocess):
    table = bench.run_workload(name, **QUICK)
    assert table.workload == name and [r.role for r in table.rows] == EXPECTED_ROWS[name]
    assert len(table.columns) == (2 if bench.WORKLOADS[name].per_length else 1)
    if bench.WORKLOADS[name].per_length:
        assert table.columns == ["L=16", "L=32"]
    floor = table.rows[0]
    for col in table.columns:
        assert floor.cells[col].ratio == 1.0 and floor.cells[col].unavailable is None
    for row in table.rows:
        assert set(row.cells) == set(table.columns)
        for cell in row.cells.values():
            assert (cell.unavailable is None) == (cell.ratio is not None)
            if cell.unavailable is None:
                assert cell.ratio > 0 and cell.seconds > 0 and cell.rounds >= bench.MIN_ROUNDS
                assert cell.peak_extra_bytes is None  # memory off in this process
    # every pebook row and the floor ran (no failures hidden as "unavailable"), but the compiled
    # fast paths, which --no-compile turns off
    for row in table.rows:
        if row.role != "peer":
            assert all(c.unavailable in (None, "compile off") for c in row.cells.values()), row.label


def test_peers_that_cannot_run_say_why(no_subprocess):
    table = bench.run_workload("rope_half", **QUICK)
    liger = next(r for r in table.rows if r.label.startswith("Liger"))
    compiled = next(r for r in table.rows if r.label.endswith("(compiled)"))
    assert compiled.cells["L=16"].unavailable == "compile off"
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine Liger may be installed")
    assert liger.cells["L=16"].unavailable in ("liger_kernel not installed", "Triton kernel, needs CUDA")
    text = bench.format_table(table)
    assert "unavailable: compile off" in text
    shaw = bench.run_workload("shaw", **QUICK)
    assert "unavailable: no library implements" in bench.format_table(shaw)


def test_a_failing_peer_is_reported_and_the_floor_is_not_optional():
    def boom():
        raise RuntimeError("no kernel for this")

    ok = lambda: torch.ones(4).sum()  # noqa: E731
    cells = bench.measure_cell(
        [bench.Candidate("floor", "floor", ok), bench.Candidate("p", "peer", boom)], repeats=1, budget=0.0
    )
    assert cells["floor"].ratio == 1.0
    assert cells["p"].ratio is None and cells["p"].unavailable == "failed: RuntimeError: no kernel for this"
    with pytest.raises(RuntimeError, match="no kernel"):
        bench.measure_cell([bench.Candidate("floor", "floor", boom)], repeats=1)
    with pytest.raises(ValueError, match="first candidate must be the floor"):
        bench.measure_cell([bench.Candidate("p", "peer", ok)])
    for bad in ({"repeats": 0}, {"min_rounds": 0}, {"min_rounds": 2.5}):
        with pytest.raises(
            ValueError, match=f"{next(iter(bad))} must be a positive int, got {next(iter(bad.values()))}"
        ):
            bench.measure_cell([bench.Candidate("floor", "floor", ok)], **bad)


def test_ratios_follow_the_work_done(no_subprocess, monkeypatch):
    monkeypatch.setattr(bench, "MIN_CALL_SECONDS", 0.01)
    x = torch.randn(256, 256)
    cells = bench.measure_cell(
        [
            bench.Candidate("floor", "floor", lambda: x @ x),
            bench.Candidate("x8", "pebook", lambda: [x @ x for _ in range(8)]),
        ],
        repeats=5,
    )
    assert 3 < cells["x8"].ratio < 20


def test_format_table_shows_ratio_memory_and_unavailable():
    cell, row = bench.Cell, bench.Row
    table = bench.Table(
        "alibi",
        "ALiBi attention",
        ["L=8", "L=16"],
        [
            row("SDPA", "floor", {"L=8": cell(1.0, 0.1, 2**20, 3), "L=16": cell(1.0, 0.2, 2 * 2**20, 3)}),
            row("mine", "pebook", {"L=8": cell(2.5, 0.25, 3 * 2**20, 3), "L=16": cell(unavailable="skipped: big")}),
            row("liger", "peer", {c: cell(unavailable="liger_kernel not installed") for c in ("L=8", "L=16")}),
        ],
        "a note",
    )
    lines = bench.format_table(table).splitlines()
    assert lines[0] == "ALiBi attention" and "L=8" in lines[2] and set(lines[3]) == {"-"}
    assert lines[4].split() == ["floor", "SDPA", "1.00x", "1.0", "MiB", "1.00x", "2.0", "MiB"]
    assert lines[5].split()[:5] == ["pebook", "mine", "2.50x", "3.0", "MiB"]
    assert lines[5].endswith("unavailable: skipped: big")
    assert lines[6].split()[:2] == ["peer", "liger"] and lines[6].endswith("unavailable: liger_kernel not installed")
    assert lines[-1] == "note: a note"
    assert bench.Table.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_nanogpt_matches_tinylm_in_size_and_its_loop_decodes_greedily():
    import pebook as pb

    for encoding, rope in (("learned", False), ("rope", True)):
        nano = bench.NanoGPT(50, 32, 2, 4, 64, rope=rope)
        tiny = pb.TinyLM(50, 32, 2, 4, 64, encoding)
        assert bench._n_params(nano) == bench._n_params(tiny)
    nano = bench.NanoGPT(50, 32, 2, 4, 64, rope=True).eval()
    prompt = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        tokens = bench.nanogpt_greedy(nano, prompt, 6)
        for step in range(6):  # the cached loop agrees with a full forward pass at every step
            logits, _ = nano(tokens[:, : 5 + step])
            assert tokens[0, 5 + step] == logits[0, -1].argmax()


def test_meta_rope_agrees_with_pebook_interleaved():
    from pebook.rope import apply_rope, rope_frequencies

    q, k = torch.randn(2, 1, 10, 3, 16).unbind(0)  # Meta's (B, L, H, D)
    qr, kr = bench.meta_apply_rotary_emb(q, k, bench.meta_rope_freqs_cis(16, 10))
    pos, inv = torch.arange(10), rope_frequencies(16)
    torch.testing.assert_close(qr, apply_rope(q.transpose(1, 2), pos, inv, "interleaved").transpose(1, 2))
    torch.testing.assert_close(kr, apply_rope(k.transpose(1, 2), pos, inv, "interleaved").transpose(1, 2))


def test_command_line_runs_workers_measures_memory_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--quick", "--lengths", "256", "--workloads", "shaw", "rope_half", "--json", str(out)]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert (
        printed.startswith("pebook.book.bench on cpu") and "Shaw attention" in printed and "RoPE on q and k" in printed
    )
    data = json.loads(out.read_text())
    assert data["environment"]["device"] == "cpu" and data["environment"]["versions"]["torch"] == torch.__version__
    assert "transformers" in data["environment"]["versions"]
    assert [t["workload"] for t in data["tables"]] == ["shaw", "rope_half"]
    shaw = bench.Table.from_dict(data["tables"][0])
    rows = {r.label: r.cells["L=256"] for r in shaw.rows}
    fast, naive = rows["shaw_attention (k=128)"], rows["reference: shaw_attention_naive"]
    # the naive formula materialises two (L, L, d) float32 tensors: 2 * 256 * 256 * 64 * 4 B = 32 MiB
    assert naive.peak_extra_bytes >= 2 * 256 * 256 * 64 * 4 > fast.peak_extra_bytes > 0
    assert rows["SDPA is_causal, no bias"].ratio == 1.0


def test_unknown_workload_is_rejected():
    with pytest.raises(ValueError, match="workload must be one of"):
        bench.run_workload("nope")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_memory_is_measured_by_the_allocator():
    table = bench.run_workload("shaw", lengths=(512,), device="cuda", quick=True, compile_peers=False, repeats=1)
    rows = {r.label: r.cells["L=512"] for r in table.rows}
    assert (
        rows["reference: shaw_attention_naive"].peak_extra_bytes
        >= 10 * rows["shaw_attention (k=128)"].peak_extra_bytes
        > 0
    )


_MAPPED_SCRIPT = """
import ctypes, torch
from pebook.book import bench
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def mapped_by_a_live_tensor():
    before = libc.mallinfo2().hblkhd
    tensor = torch.empty(2**20)  # 4 MiB
    return libc.mallinfo2().hblkhd - before
assert bench.cpu_memory_measurable()
fresh = mapped_by_a_live_tensor()
with bench.steady_allocator():
    mapped_by_a_live_tensor()
    steady = mapped_by_a_live_tensor()
after = mapped_by_a_live_tensor()
print(fresh, steady, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
def test_rounds_are_timed_on_the_heap_not_on_fresh_mappings():
    """A memory worker maps every allocation above 64 KiB afresh (its pages fault in on each call);
    steady_allocator serves a 4 MiB tensor from the heap while the rounds are timed, then gives
    the worker's setting back."""
    env = dict(os.environ, **bench.MEMORY_ENV)
    done = subprocess.run([sys.executable, "-c", _MAPPED_SCRIPT], env=env, capture_output=True, text=True, check=True)
    fresh, steady, after = map(int, done.stdout.split())
    assert fresh >= 2**22 and after >= 2**22, (fresh, after)
    assert steady == 0
