"""The benchmark harnesses at tiny size: ours and the reference must give the same outputs (speed is
not checked here; benchmarks/README.md records it)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_factorized  # noqa: E402
import bench_featurize  # noqa: E402
import bench_project  # noqa: E402
import bench_score  # noqa: E402
import bench_tf32  # noqa: E402
import run  # noqa: E402
import stage_throughput  # noqa: E402
from presets import preset_settings  # noqa: E402


@pytest.mark.parametrize("bench", [bench_featurize, bench_project, bench_score])
def test_harness_outputs_agree_with_reference(bench):
    rows = bench.run(full=False)
    assert rows
    for r in rows:
        assert r["ok"], f"{r['engine']} {r['case']}: max rel. diff {r['max_rel_diff']:.2e} > {r['tol']:.0e}"
        assert r["ours_s"] > 0 and r["ref_s"] > 0


def test_harness_diff_is_sensitive():
    """A harness's comparison would catch a wrong output: perturb one value of a reference."""
    x, xq, masks, truth = bench_score.problem(30, 20, 5, 6)
    lambdas = [0.1, 1.0]
    preds, _ = bench_score.ours(x, xq, masks, truth, lambdas)
    ref, _ = bench_score.reference(x, xq, masks, truth, lambdas)
    assert bench_score.max_rel_diff(preds, ref) <= bench_score.TOL_PRED
    ref[1, 2, 3] *= 1.001
    assert bench_score.max_rel_diff(preds, ref) > bench_score.TOL_PRED


def test_run_prints_the_table_and_fails_on_a_difference(capsys, monkeypatch):
    assert run.main(["score"]) == 0
    out = capsys.readouterr().out
    assert "| engine | case | ours (s)" in out and "score: LDS per lambda" in out
    monkeypatch.setattr(bench_score, "TOL_LDS", -1.0)  # no difference can pass a negative tolerance
    assert run.main(["score"]) == 1


def test_stacked_training_comparison_runs_the_same_gradients():
    """stage_throughput's comparison checks (without dropout) that the stacked models' gradients are
    the models' own, then times both ways; here at the tiny preset's size."""
    import numpy as np
    import torch

    images = np.random.default_rng(0).uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32)
    line = stage_throughput.stacked_against_sequential(preset_settings("tiny"), images, torch.device("cpu"),
                                                       repeats=1)
    assert line.startswith("batch 16 each, fp32: one after another ") and " s per step (" in line


def test_training_option_rates_are_named_by_their_options():
    """stage_throughput's training speed options at the tiny preset's size, without the compiled variants
    (minutes of compilation on a CPU): the plain rate and channels_last's, named as printed."""
    import math

    import torch

    rates = stage_throughput.option_throughputs(preset_settings("tiny"), torch.device("cpu"), steps=2,
                                                variants=["", "_cl"])
    assert list(rates) == ["train_step_fp32", "train_step_fp32_cl"]
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())


def test_tf32_truncation_keeps_ten_mantissa_bits():
    """Against the bits themselves: the low 13 of the 23 mantissa bits cleared, sign and exponent kept."""
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32) * np.float32(1e3)
    expected = (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    np.testing.assert_array_equal(bench_tf32.truncate_to_tf32(torch.from_numpy(x)).numpy(), expected)
    assert bench_tf32.truncate_to_tf32(torch.tensor([1 + 2 ** -10 + 2 ** -11])).item() == 1 + 2 ** -10


def test_emulated_tf32_products_read_truncated_operands():
    """A convolution, its two gradients and a Linear layer under the emulation equal the same computed
    in fp32 on operands truncated beforehand, and differ from plain fp32; a bias stays fp32."""
    t = bench_tf32.truncate_to_tf32
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=g) for shape in ((2, 3, 5, 5), (4, 3, 3, 3), (4,)))
    upstream = torch.randn(2, 4, 3, 3, generator=g)

    def conv(x, w, b, upstream):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = torch.nn.functional.conv2d(x, w, b)
        return (out, *torch.autograd.grad(out, (x, w), upstream))

    with bench_tf32.TF32Products():
        emulated = conv(x, w, b, upstream)
    # input gradient: upstream x weight; weight gradient: upstream x input (each product truncated)
    reference = (conv(t(x), t(w), b, upstream)[0], conv(x, t(w), b, t(upstream))[1],
                 conv(t(x), w, b, t(upstream))[2])
    plain = conv(x, w, b, upstream)
    for ours, ref, fp32 in zip(emulated, reference, plain):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        assert not torch.equal(ours, fp32) and torch.allclose(ours, fp32, rtol=1e-2, atol=1e-2)
    linear = torch.nn.Linear(3, 2)
    with bench_tf32.TF32Products():
        out = linear(x[:, :, 0, :3])
    torch.testing.assert_close(out, torch.nn.functional.linear(t(x[:, :, 0, :3]), t(linear.weight), linear.bias),
                               rtol=0, atol=0)


def test_kronecker_variance_matches_monte_carlo():
    """bench_factorized's closed forms against the sample variance of 400000 draws of each sketch."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    h = 0.8 * g + 0.6 * torch.randn(5, 7, generator=gen, dtype=torch.float64)  # correlated, as gradients are
    s_out, s_in, columns = 2, 3, 6
    kron, sketch = [], []
    for _ in range(8):  # 8 x 50000 draws, to keep the matrices small
        p_out = torch.randn(50_000, 5, s_out, generator=gen, dtype=torch.float64) / s_out ** 0.5
        p_in = torch.randn(50_000, 7, s_in, generator=gen, dtype=torch.float64) / s_in ** 0.5
        kron.append(((p_out.transpose(1, 2) @ g @ p_in) * (p_out.transpose(1, 2) @ h @ p_in)).sum((1, 2)))
        dense = torch.randn(50_000, 35, columns, generator=gen, dtype=torch.float64) / columns ** 0.5
        sketch.append((torch.einsum("p,npc->nc", g.flatten(), dense) *
                       torch.einsum("p,npc->nc", h.flatten(), dense)).sum(1))
    kron, sketch = torch.cat(kron), torch.cat(sketch)
    assert kron.mean().item() == pytest.approx((g * h).sum().item(), rel=0.02)
    assert kron.var().item() == pytest.approx(bench_factorized.kronecker_variance(g, h, s_out, s_in), rel=0.03)
    assert sketch.var().item() == pytest.approx(bench_factorized.dense_variance(g, h, columns), rel=0.03)
    # the terms in 1 / s alone fall well short at these sides: the test tells them apart
    m = h @ g.T
    trace_m2 = torch.trace(m @ m).item()
    first_order = (m.pow(2).sum().item() + trace_m2) / s_out + ((g.T @ h).pow(2).sum().item() + trace_m2) / s_in
    assert kron.var().item() > 1.2 * first_order
