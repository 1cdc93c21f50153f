"""The period boundary as one pure function per tensor (rule.boundary_tensor): its compiled
twin (the fused path) equals it bit for bit, and the statistics it keeps in passing equal a
direct computation (exact min, max, mean; the median from a histogram: its bin's mean where
the bin was summed, exact on the presets' lattice, else within half a bin)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_activelr.optim import rule
from hf_activelr.optim import stats as gain_statistics
from hf_activelr.optim._fused import fused_boundary

OPTIONS = [
    dict(zero_sum="hold", significance=None, gain_increase="additive", gain_min=None,
         gain_max=None, gain_init=1.0),
    dict(zero_sum="hold", significance=2.0, gain_increase="multiplicative", gain_min=0.03,
         gain_max=30.0, gain_init=0.3),
    dict(zero_sum="flip", significance=None, gain_increase="multiplicative", gain_min=0.01,
         gain_max=10.0, gain_init=1.0),
    dict(zero_sum="flip", significance=1.0, gain_increase="additive", gain_min=None,
         gain_max=None, gain_init=0.5),
    # the tensor-wide test, with and without the per-element one
    dict(zero_sum="hold", significance=2.0, gain_increase="multiplicative", gain_min=0.03,
         gain_max=30.0, gain_init=0.3, pooled=2.0),
    dict(zero_sum="flip", significance=None, gain_increase="multiplicative", gain_min=0.01,
         gain_max=10.0, gain_init=1.0, pooled=1.0),
]


def _states(option, n=4000, grad_sum_dtype=None, seed=0, gain_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    states = []
    for shape in ((n,), (37, 11)):
        state: dict = {}
        rule.init_state(torch.zeros(shape), state, option["zero_sum"], grad_sum_dtype,
                        option["significance"] is not None, gain_dtype)
        numel = state["gain"].numel()
        lattice = 1.5 ** torch.randint(-4, 5, (numel,), generator=generator).float()
        signs = torch.randint(0, 3, (numel,), generator=generator).float() - 1  # -1, 0, 1
        state["gain"].view(-1).copy_(lattice * torch.where(signs == 0, 1.0, signs))
        if option["zero_sum"] == "hold":
            state["gain"].view(-1)[signs == 0] = 0.0  # "no sign yet"
        else:
            state["gain"].abs_()
            state["prev_sign"].view(-1).copy_(
                torch.randint(-1, 3, (numel,), generator=generator).to(torch.int8))
        sums = torch.randn(numel, generator=generator) * 3
        sums[::7] = 0.0
        sums[5], sums[6], sums[8] = math.nan, math.inf, -math.inf
        state["grad_sum"].view(-1).copy_(sums)
        if "grad_sq_sum" in state:
            squares = torch.rand(numel, generator=generator) * 4
            squares[6] = math.inf
            state["grad_sq_sum"].view(-1).copy_(squares)
        states.append(state)
    return states


def _group(option):
    return {"lr_high": 0.5, "lr_low": 0.5, "pooled": None, **option}


def _clone(states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


#: (grad_sum_dtype, gain_dtype): the default, bfloat16 sums, the lean state
STORAGES = [(None, None), ("bfloat16", None), ("bfloat16", "bfloat16")]
STORAGE_IDS = ["fp32", "sum-bf16", "lean"]


@pytest.mark.parametrize("option", OPTIONS, ids=range(len(OPTIONS)))
@pytest.mark.parametrize("grad_sum_dtype,gain_dtype", STORAGES, ids=STORAGE_IDS)
def test_statistics_kept_by_the_boundary_equal_a_direct_computation(option, grad_sum_dtype,
                                                                    gain_dtype):
    # a first boundary finds the median's bin; the same boundary again, told that bin, sums
    # its gains (as the optimizer does from one period to the next)
    probe = gain_statistics.GainStats(torch.device("cpu"))
    rule.end_period(_states(option, grad_sum_dtype=grad_sum_dtype, gain_dtype=gain_dtype),
                    _group(option), stats=probe)
    probe.median()
    states = _states(option, grad_sum_dtype=grad_sum_dtype, gain_dtype=gain_dtype)
    stats = gain_statistics.GainStats(torch.device("cpu"), (probe.find_median_bin(), 0, 1))
    counts = rule.end_period(states, _group(option), stats=stats)
    summary = gain_statistics.gain_summary(None, counts, option["gain_init"], stats)
    gains = torch.cat([rule.decode_gain(s["gain"]).flatten() for s in states]).double()
    gains *= option["gain_init"]
    assert summary["elements"] == gains.numel() == counts["elements"]
    assert summary["min"] == pytest.approx(gains.min().item(), rel=1e-7)
    assert summary["max"] == pytest.approx(gains.max().item(), rel=1e-7)
    assert summary["mean"] == pytest.approx(gains.mean().item(), rel=1e-12)
    # lattice gains, one value per bin: the median is exact (the bin's sum / count);
    # without the bin's sum, the bin's middle
    exact = gains.median().item()
    assert summary["median"] == pytest.approx(exact, rel=1e-12)
    middle = gain_statistics.gain_summary(None, counts, option["gain_init"], probe)["median"]
    assert middle == pytest.approx(exact, rel=2 ** (0.5 / gain_statistics.HIST_BINS_PER_OCTAVE) - 1)
    assert middle != pytest.approx(exact, rel=1e-12)
    assert counts["nonfinite"] == 6  # NaN, +inf, -inf in each of the two tensors
    # the same figures from the gains alone (after a load: no boundary statistics)
    again = gain_statistics.gain_summary([s["gain"] for s in states], counts, option["gain_init"])
    assert again == pytest.approx(summary, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_median_of_continuous_gains_is_within_a_bin(dtype):
    """Continuous gains, many per bin: the median is its bin's mean (after a load, a second
    pass sums that bin), within a bin (2**(1/128)) of the exact one; without that sum, the
    bin's middle, within half a bin."""
    generator = torch.Generator().manual_seed(3)
    gains = torch.exp(torch.randn(100_001, generator=generator, dtype=torch.float64) * 2)
    gains = gains.to(dtype)
    exact = gains.median().item()
    one_bin = 2 ** (1 / gain_statistics.HIST_BINS_PER_OCTAVE)
    summary = gain_statistics.gain_summary([gains], None)
    assert exact / one_bin <= summary["median"] <= exact * one_bin
    assert summary["min"] == gains.min().item() and summary["max"] == gains.max().item()
    stats = gain_statistics.GainStats(torch.device("cpu"))
    stats.add_gains(gains)
    assert exact / one_bin**0.5 <= stats.median() <= exact * one_bin**0.5


def test_median_from_gains_is_exact_on_a_lattice():
    """After a load (no boundary kept the statistics) the median of lattice gains is exact:
    a second pass sums the median's bin."""
    generator = torch.Generator().manual_seed(5)
    gains = 0.3 * 1.5 ** torch.randint(-6, 7, (10_001,), generator=generator).float()
    assert gain_statistics.gain_summary([gains], None)["median"] == gains.median().item()


def test_a_wrong_guess_of_the_median_bin_is_harmless():
    """The boundary sums the gains of the last median's bins; if the median moved to another
    bin, the figure is that bin's middle (within half a bin), never a wrong bin's mean."""
    states = _states(OPTIONS[1])
    one = int(gain_statistics.histogram_bin(torch.tensor([1.0])))
    stats = gain_statistics.GainStats(torch.device("cpu"), (one + 300, one + 301, one + 302))
    counts = rule.end_period(states, _group(OPTIONS[1]), stats=stats)
    gains = torch.cat([rule.decode_gain(s["gain"]).flatten() for s in states]).double() * 0.3
    median = gain_statistics.gain_summary(None, counts, 0.3, stats)["median"]
    assert median == pytest.approx(gains.median().item(),
                                   rel=2 ** (0.5 / gain_statistics.HIST_BINS_PER_OCTAVE) - 1)
    assert stats.find_median_bin() not in stats.guess


def test_the_optimizer_remembers_the_median_bin():
    """An optimizer whose statistics are read reports the medians of its lattice gains
    (float32) to float32 precision: each boundary sums the bins the last median may move to."""
    from hf_activelr import ActiveAdamW, preset_kwargs

    params = [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(50))]
    optimizer = ActiveAdamW(params, lr=1e-2, **{**preset_kwargs("significant"), "period": 3,
                                                 "significance": 1.0})
    generator = torch.Generator().manual_seed(1)
    exact_seen = 0
    for _ in range(39):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) + 0.3
        optimizer.step()
        median = optimizer.gain_stats()[0]["median"]
        gains = torch.cat([rule.decode_gain(optimizer.state[p]["gain"]).flatten()
                           for p in params]).double() * optimizer.param_groups[0]["gain_init"]
        assert median == pytest.approx(gains.median().item(), rel=2**-8)
        # the bin's mean: the lattice values a bin holds differ by float32 roundings only
        exact_seen += median == pytest.approx(gains.median().item(), rel=1e-6)
    assert exact_seen >= 35


def test_median_bins_cover_the_whole_float32_range():
    """Gains from the float32 floor to far above 1 (a collapsed gain, a bound of 1e30): each
    in its own bin, the median right."""
    tiny = torch.finfo(torch.float32).tiny
    for values in ([tiny, tiny, 1e30], [1e-30, 3.0, 1e30], [0.3, 0.3, 2.0**100]):
        gains = torch.tensor(values)
        summary = gain_statistics.gain_summary([gains], None)
        assert summary["median"] == pytest.approx(gains.median().item(), rel=2**-8)
        assert summary["min"] == gains.min().item() and summary["max"] == gains.max().item()


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS, ids=range(len(OPTIONS)))
@pytest.mark.parametrize("grad_sum_dtype,gain_dtype", STORAGES, ids=STORAGE_IDS)
def test_compiled_boundary_equals_the_eager_one(option, grad_sum_dtype, gain_dtype):
    eager = _states(option, grad_sum_dtype=grad_sum_dtype, seed=4, gain_dtype=gain_dtype)
    fused = _clone(eager)
    # told a bin to sum (the one of 1.5, on the test's lattice), as from the second period on
    bins = tuple(int(b) for b in gain_statistics.histogram_bin(torch.tensor([1.5, 1.0, 2.25])))
    eager_stats = gain_statistics.GainStats(torch.device("cpu"), bins)
    fused_stats = gain_statistics.GainStats(torch.device("cpu"), bins)
    eager_counts = rule.end_period(eager, _group(option), stats=eager_stats)
    fused_counts = rule.end_period(fused, _group(option), fused_boundary, fused_stats)
    assert eager_counts == fused_counts
    for a, b in zip(eager, fused):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert gain_statistics.gain_summary(None, eager_counts, 1.0, eager_stats) == pytest.approx(
        gain_statistics.gain_summary(None, fused_counts, 1.0, fused_stats), rel=1e-12)
    assert torch.equal(eager_stats.guess_count, fused_stats.guess_count)
    assert (eager_stats.guess_count > 0).all()
    torch.testing.assert_close(eager_stats.guess_sum, fused_stats.guess_sum, rtol=1e-12, atol=0)


def test_gain_stats_after_a_boundary_read_no_gain(monkeypatch):
    """Once gain_stats() has been called, each boundary keeps the figures in passing: the next
    call sums up a histogram, it does not read the gains again. Before the first call, the
    boundaries keep nothing (a loop that never asks does not pay)."""
    from hf_activelr import ActiveAdamW

    reads = []
    original = gain_statistics.GainStats.add_gains
    monkeypatch.setattr(gain_statistics.GainStats, "add_gains",
                        lambda self, gain: (reads.append(gain.numel()), original(self, gain)))
    params = [torch.nn.Parameter(torch.randn(40, 3)), torch.nn.Parameter(torch.randn(7))]
    optimizer = ActiveAdamW(params, lr=1e-2, period=2)
    for step in range(4):
        for param in params:
            param.grad = torch.randn_like(param) + 0.5
        optimizer.step()
    assert optimizer._stats_cache().boundary == {}  # nobody asked: nothing kept
    first = optimizer.gain_stats()
    # the first call reads the gains: the histogram, then the sum of the median's bin
    assert reads == [120, 7, 120, 7]
    for step in range(4, 6):
        for param in params:
            param.grad = torch.randn_like(param) + 0.5
        optimizer.step()
    after = optimizer.gain_stats()
    assert reads == [120, 7, 120, 7]  # kept by the boundary at step 6
    assert after[0]["step"] == 6 and after[0] != first[0]
    fresh = [rule.decode_gain(optimizer.state[p]["gain"]).flatten() for p in params]
    everything = torch.cat(fresh).double()
    assert after[0]["mean"] == pytest.approx(everything.mean().item(), rel=1e-12)
    assert after[0]["min"] == everything.min().item()


def test_gain_stats_figures_are_plain_numbers():
    """JSON-ready: report_to backends and results.json take them as they are."""
    import json

    from hf_activelr import ActiveAdamW

    params = [torch.nn.Parameter(torch.randn(8, 3))]
    optimizer = ActiveAdamW(params, lr=1e-2, period=2)
    optimizer.gain_stats()  # tracking from the start
    for _ in range(4):
        params[0].grad = torch.randn_like(params[0])
        optimizer.step()
    stats = optimizer.gain_stats()[0]
    assert all(isinstance(value, (int, float)) for value in stats.values()), stats
    json.dumps(stats)


def test_pooled_factor_is_a_sign_test_on_agreements_and_flips():
    """``pooled=z``: a tensor's gains all grow where agreements exceed flips by more than
    ``z * sqrt(agreements + flips)``, all shrink where flips exceed agreements by as much,
    else hold (and hold with no counted sign at all)."""
    def factor(agreed, flipped, z=2.0):
        return float(rule.pooled_factor(torch.tensor(float(agreed)), torch.tensor(
            float(flipped)), z, 1.5, 1 / 1.5))

    assert factor(100, 10) == 1.5 and factor(10, 100) == pytest.approx(1 / 1.5)
    assert factor(55, 45) == 1.0 and factor(0, 0) == 1.0
    # the margin: 2 * sqrt(100) = 20
    assert factor(60, 40) == 1.0 and factor(61, 39) == 1.5


@pytest.mark.parametrize("gain_dtype", [None, "bfloat16"])
def test_at_bounds_counts_gains_held_by_a_bound_and_no_other(gain_dtype):
    """The one definition of "at a bound" (stats.at_bounds), for float32 and bfloat16 gains:
    gains the rule clamped count, gains one step inside do not."""
    from hf_activelr import ActiveAdamW

    param = torch.nn.Parameter(torch.zeros(4))
    opt = ActiveAdamW([param], lr=1e-3, period=1, lr_high=0.5, lr_low=1 / 1.5,
                      gain_increase="multiplicative", gain_init=10**-0.5, gain_min=0.03,
                      gain_max=30.0, gain_dtype=gain_dtype)
    for _ in range(40):  # elements 0-1 keep their sign (to gain_max), 2-3 flip (to gain_min)
        param.grad = torch.tensor([1.0, 1.0, 1.0, -1.0]) * torch.tensor(
            [1.0, 1.0, (-1.0) ** _, (-1.0) ** _])
        opt.step()
    group, gain = opt.param_groups[0], opt.state[param]["gain"]
    assert gain_statistics.at_bounds(gain, group) == (2, 2)
    inside = {**group, "gain_max": 30.0 * 1.5, "gain_min": 0.03 / 1.5}
    assert gain_statistics.at_bounds(gain, inside) == (0, 0)
