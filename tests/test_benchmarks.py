"""The benchmark scripts run end to end on a tiny shape (their figures are recorded in BENCHMARKS.md, not here)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_suite_runs_on_cpu_with_a_tiny_shape(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--tiny", "--steps", "2", "--warmup", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    loops = {(r["loop"], r.get("compile")) for r in result["rows"]}
    assert {("bare", False), ("Trainer", False), ("bare", True), ("Trainer", True)} <= loops
    assert all(r["tokens/s"] > 0 for r in result["rows"] if "tokens/s" in r)
    assert any(r["case"].startswith("greedy decode") for r in result["rows"])
    assert "GPU suite on CPU" in done.stdout


def test_path_star_benchmark_trains_tests_and_writes_its_table(tmp_path):
    out = tmp_path / "path_star.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.path_star", "--runs", "reverse", "--steps", "2",
                           "--test_size", "64", "--save_dir", str(tmp_path), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    # smoke test of the table: two steps from random init find none of the 64 paths (the benchmark's own figures
    # are in BENCHMARKS.md); a figure above 0 is a scorer that accepts wrong paths
    assert row["run"] == "reverse" and row["steps"] == 2 and row["test accuracy"] == 0.0
    assert "path-star G(2, 5, 50)" in done.stdout


def test_linear_rows_benchmark_times_each_form_at_each_row_count(tmp_path):
    from benchmarks import linear_rows
    rows = linear_rows.main(["--rows", "1", "4", "--calls", "1", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert [(r["weights"], r["rows"]) for r in rows] == [("trunk, 16 matrices", 1), ("trunk, 16 matrices", 4),
                                                          ("unembedding 4096 x 256", 1), ("unembedding 4096 x 256", 4)]
    assert all(r[f"{form} (ms)"] > 0 for r in rows for form in linear_rows.FORMS)
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == rows


def test_memory_horizons_read_the_step_sizes_of_each_mamba_block():
    """benchmarks.ssm.memory_horizons: with every step size 0.01 and the slowest state's |A| = 1 (S4D-real init),
    each channel forgets to 1/e after 100 tokens; halving one block's step sizes doubles its horizon."""
    import math
    import pytest
    import torch
    import models
    from benchmarks.ssm import memory_horizons
    from objectives import NextTokenPrediction
    model = NextTokenPrediction(models.Mamba(d_model=16, n_layers=2, d_state=4), vocab_size=8)
    for block, step in zip(model.trunk.blocks, (0.01, 0.005)):
        torch.nn.init.zeros_(block.mixer.dt_proj.weight)
        torch.nn.init.constant_(block.mixer.dt_proj.bias, math.log(math.expm1(step)))  # softplus^-1
    horizons = memory_horizons(model, torch.randint(0, 8, (1, 40)))
    assert horizons == {"layer 0 horizon p90 / max": "100 / 100", "layer 1 horizon p90 / max": "200 / 200"}
    # a step size that depends on the token: larger at token 7, the marked position's
    block = model.trunk.blocks[0].mixer
    torch.nn.init.zeros_(block.x_proj.weight)
    tokens = torch.randint(0, 7, (1, 40))
    tokens[0, 20] = 7
    horizons = memory_horizons(model, tokens, marked=20)
    # nothing reads the input: not selective
    assert horizons["layer 0 step at marked / elsewhere"] == pytest.approx(1.0)
    with torch.no_grad():  # token 7 alone reaches the step size: embedding, in_proj, the conv's current tap, x_proj
        model.embed.weight.zero_()
        model.embed.weight[7] = 1.0
        block.in_proj.weight.fill_(1.0)
        block.conv1d.weight.zero_()
        block.conv1d.weight[:, 0, -1] = 1.0
        block.conv1d.bias.zero_()
        block.x_proj.weight[:block.dt_rank] = 1.0
        block.dt_proj.weight.fill_(1.0)
    assert memory_horizons(model, tokens, marked=20)["layer 0 step at marked / elsewhere"] > 3


def test_trunk_step_rates_compare_mamba2_with_and_without_recompute_to_the_transformer(monkeypatch):
    """benchmarks.ssm part e at a tiny length: one row per trunk, the transformer's ratio 1, and the variant really
    without recompute (the shipped config has it on)."""
    from benchmarks import ssm
    built, real = [], ssm.quickstart_trunk
    monkeypatch.setattr(ssm, "quickstart_trunk", lambda kind, n: built.append(real(kind, n)) or built[-1])
    rows = ssm.trunk_step_rates((32,), repeats=1)
    assert [r["trunk"] for r in rows] == ["Transformer d256 x4", "Mamba-2 d256 x7 (recompute, as shipped)",
                                          "Mamba-2 d256 x7, no recompute"]
    assert rows[0]["x transformer tok/s (best)"] == 1.0
    shipped, no_recompute = built[0], built[1]
    assert all(b.mixer.recompute for b in shipped.blocks) and not any(b.mixer.recompute for b in no_recompute.blocks)
