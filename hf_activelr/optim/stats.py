"""Gain statistics: the one reader of gains for figures (``gain_stats()``, the Trainer's
log line and table, the sweep's health record, the model card).

- the whole group's min, median, mean and max, from a histogram the period boundary fills in
  passing (:class:`GainStats`, :func:`gain_summary`; the compiled boundary bins the gains with
  :func:`histogram_bin` in the same pass that adapts them);
- the share of gains at a bound, counted one way (:func:`at_bounds`);
- layer types for per-layer figures (:func:`layer_type`).

Across ranks (FSDP2, ZeRO) ``distributed.gain_stats`` combines the same figures of each
rank's own gains.
"""

from __future__ import annotations

import math
import re

import torch

from . import rule  # decode_gain, local_tensor (rule imports this module for its bins)

#: Gain statistics without sorting: the median is read from a histogram of ``log2(gain)``
#: (relative to ``gain_init``), 128 bins per octave over the whole float32 range, counted by one
#: ``bincount``. The boundary also sums, in float64, the gains of three
#: bins: the last median's, and the bins of that median grown and shrunk once by the rule (where
#: a median that moves goes first: :func:`median_guesses`); when the new median falls in one of
#: them, the median is that bin's mean, exact when the bin holds one value (the usual case: the
#: presets' gains lie on a lattice ``1.5 ** k``, up to float32 roundings); otherwise it is the
#: bin's middle, within half a bin (0.27%) of the exact one. (Bins that all summed their values
#: in float64 made the boundary's statistics cost about twice as much; bins taken from the
#: float's bits (a bit cast) or stored as int16 kept the compiled CPU kernel from vectorizing:
#: several times slower. README, "Benchmarks".)
HIST_BINS_PER_OCTAVE = 128
HIST_OCTAVES = 128  # each side of 1: [2**-128, 2**128)
HIST_BINS = 2 * HIST_OCTAVES * HIST_BINS_PER_OCTAVE


def histogram_bin(gain):
    """Each (positive) gain's histogram bin (:data:`HIST_BINS`), int32 (compiled for CPU, an
    int16 result kept the whole boundary kernel from vectorizing)."""
    position = torch.log2(gain.to(torch.promote_types(gain.dtype, torch.float32)))
    position = (position + HIST_OCTAVES) * HIST_BINS_PER_OCTAVE
    return position.floor().clamp(0, HIST_BINS - 1).to(torch.int32)


def bin_value(index: int) -> float:
    """A bin's geometric middle."""
    return 2.0 ** ((index + 0.5) / HIST_BINS_PER_OCTAVE - HIST_OCTAVES)


class GainStats:
    """What a group's gains sum up to, accumulated tensor by tensor: exact counts, min, max
    and sum, and the histogram the median is read from. Combines across ranks by addition
    (and min / max)."""

    def __init__(self, device, median_bins: tuple | None = None):
        self.device = device
        # the bins whose gains are summed (median_guesses), and what they count and sum to
        self.guess = None if median_bins is None else tuple(int(b) for b in median_bins)
        self.guess_count = torch.zeros(GUESSES, dtype=torch.int64, device=device)
        self.guess_sum = torch.zeros(GUESSES, dtype=torch.float64, device=device)
        self.median_value: float | None = None  # relative; set by median()
        self.grew = self.shrank = self.nonfinite = 0
        self.changed_elements = 0
        self.elements = 0
        self.low = math.inf
        self.high = -math.inf
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)

    def add(self, bins, low, high, total, in_bin=None, in_bin_sum=None) -> None:
        """A tensor's statistics; ``in_bin`` / ``in_bin_sum``: how many of its gains fall in
        each bin of ``self.guess``, and their sums."""
        bins, low, high, total = (rule.local_tensor(t) for t in (bins, low, high, total))
        if in_bin is not None:
            self.guess_count += rule.local_tensor(in_bin).to(self.device)
            self.guess_sum += rule.local_tensor(in_bin_sum).to(self.device)
        self.elements += bins.numel()
        # min / max stay on the device: no host sync per tensor
        low, high = low.to(self.device, torch.float64), high.to(self.device, torch.float64)
        self.low = low if not torch.is_tensor(self.low) else torch.minimum(self.low, low)
        self.high = high if not torch.is_tensor(self.high) else torch.maximum(self.high, high)
        self.total += total.to(self.device)
        self.count += torch.bincount(bins.reshape(-1), minlength=HIST_BINS).to(self.device)

    def add_gains(self, gain) -> None:
        """Add a tensor of decoded (relative) gains."""
        gain = rule.local_tensor(gain)
        if gain.numel():
            low, high = torch.aminmax(gain)
            bins = histogram_bin(gain)
            in_bin = in_bin_sum = None
            if self.guess is not None:
                masks = [bins == guess for guess in self.guess]
                in_bin = torch.stack([mask.sum() for mask in masks])
                in_bin_sum = torch.stack([gain[mask].sum(dtype=torch.float64)
                                          for mask in masks])
            self.add(bins, low, high, gain.sum(dtype=torch.float64), in_bin, in_bin_sum)

    @classmethod
    def from_gains(cls, gains: list, device) -> GainStats:
        """The statistics of packed gain tensors (after a load: no boundary kept them), in
        two passes: the histogram, then the sum of the median's bin (exact medians)."""
        first = cls(device)
        for gain in gains:
            first.add_gains(rule.decode_gain(gain))
        if first.elements == 0:
            return first
        second = cls(device, (first.find_median_bin(),) * GUESSES)
        for gain in gains:
            second.add_gains(rule.decode_gain(gain))
        return second

    def find_median_bin(self) -> int:
        """The bin of the lower median (as ``torch.median``'s)."""
        rank = (self.elements - 1) // 2
        cumulative = torch.cumsum(self.count, 0)
        return int(torch.searchsorted(cumulative, torch.tensor(
            rank + 1, dtype=torch.int64, device=cumulative.device)))

    def median(self) -> float:
        """The lower median (as ``torch.median``'s): the mean of its bin's values where the
        bin was summed (exact when it holds one value), else the bin's middle (within half a
        bin); never outside the exact min and max (:data:`HIST_BINS`)."""
        index = self.find_median_bin()
        value = bin_value(index)
        if self.guess is not None and index in self.guess:
            k = self.guess.index(index)
            if int(self.guess_count[k]) > 0:
                value = float(self.guess_sum[k]) / int(self.guess_count[k])
        value = self.median_value = min(max(value, float(self.low)), float(self.high))
        return value

    def summary(self, gain_init: float) -> dict:
        if self.elements == 0:
            return {"min": gain_init, "median": gain_init, "mean": gain_init,
                    "max": gain_init, "grew": 0.0, "shrank": 0.0, "elements": 0,
                    "nonfinite": 0}
        changed = max(self.changed_elements, 1)
        return {
            "nonfinite": self.nonfinite,
            "min": float(self.low) * gain_init,
            "median": self.median() * gain_init,
            "mean": float(self.total) / self.elements * gain_init,
            "max": float(self.high) * gain_init,
            "grew": self.grew / changed,
            "shrank": self.shrank / changed,
            "elements": self.elements,
        }


#: Bins whose gains a boundary sums (see :data:`HIST_BINS`).
GUESSES = 3


def median_guesses(median: float, group: dict) -> tuple:
    """The bins a (relative) median of the last boundary is likeliest to be in after the
    next: its own, and the bins of that value grown and shrunk once by the group's rule."""
    grown = (median * (1.0 + group["lr_high"]) if group["gain_increase"] == "multiplicative"
             else median + group["lr_high"] / group["gain_init"])
    values = torch.tensor([median, grown, median * group["lr_low"]], dtype=torch.float32)
    return tuple(int(b) for b in histogram_bin(values))


def gain_summary(gains: list[torch.Tensor], changes: dict | None, gain_init: float = 1.0,
                 stats: GainStats | None = None, medians: dict | None = None,
                 key=None) -> dict:
    """min / median / mean / max of the gains (the stored ones times ``gain_init``) and the
    shares that grew or shrank last time. From ``stats`` (kept by the last boundary) in
    O(histogram bins); else from ``gains`` in two passes per tensor (no concatenation, no
    sort). ``medians[key]``: where the (relative) median is remembered (the next boundary
    sums the gains of the bins it may move to: :data:`HIST_BINS`)."""
    if stats is None:
        stats = GainStats.from_gains(gains, gains[0].device if gains else torch.device("cpu"))
        changes = changes or {}
        stats.grew, stats.shrank = changes.get("grew", 0), changes.get("shrank", 0)
        stats.nonfinite = changes.get("nonfinite", 0)
        stats.changed_elements = changes.get("elements", 0)
    summary = stats.summary(gain_init)
    if medians is not None and stats.median_value is not None:
        medians[key] = stats.median_value
    return summary


def bound_tolerance(gain: torch.Tensor) -> float:
    """How near a bound a stored gain counts as at it: one unit in the last place of the
    gains' storage (float32: 1.2e-7, bfloat16: 2**-7): the clamped value, stored, rounds
    by half of that; the product with ``gain_init`` is taken in float64."""
    return torch.finfo(gain.dtype).eps


def at_bounds(gain: torch.Tensor, group: dict) -> tuple[int, int]:
    """How many of a stored gain tensor's elements (this rank's part) sit at the group's
    ``gain_min`` and at its ``gain_max`` (0 without the bound)."""
    if group["gain_min"] is None and group["gain_max"] is None:
        return 0, 0
    relative = rule.decode_gain(rule.local_tensor(gain))
    return count_at_bounds(relative, group, bound_tolerance(gain))


def count_at_bounds(relative: torch.Tensor, group: dict, tolerance: float) -> tuple[int, int]:
    """The one definition of "at a bound": gains (``relative``: decoded, before
    ``gain_init``) within ``tolerance`` (relative, :func:`bound_tolerance`) of the group's
    ``gain_min`` / ``gain_max``."""
    real = relative.double() * group["gain_init"]
    at_min = at_max = 0
    if group["gain_min"] is not None:
        at_min = int((real <= group["gain_min"] * (1 + tolerance)).sum())
    if group["gain_max"] is not None:
        at_max = int((real >= group["gain_max"] * (1 - tolerance)).sum())
    return at_min, at_max


def layer_type(name: str) -> str:
    """A parameter's layer type: its name with block indices starred, so that the repeated
    blocks of a transformer share one row or histogram (``h.3.attn.c_attn.weight`` ->
    ``h.*.attn.c_attn.weight``, ``model.layers.3`` -> ``model.layers.*``)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def gain_table(figures: list[dict]) -> str:
    """Per param group (``gain_stats()``'s figures with the shares ``at_gain_min`` and
    ``at_gain_max``): elements, min / median / mean / max gain and the shares at the bounds,
    as a markdown table; groups without gains are left out, "" when none has any."""
    lines = ["| group | elements | min | median | mean | max | at gain_min | at gain_max |",
             "|---|---|---|---|---|---|---|---|"]
    for index, row in enumerate(figures):
        if row["elements"]:
            lines.append(
                f"| {index} | {row['elements']} | {row['min']:.3g} | {row['median']:.3g} | "
                f"{row['mean']:.3g} | {row['max']:.3g} | {row['at_gain_min']:.1%} | "
                f"{row['at_gain_max']:.1%} |")
    return "\n".join(lines) if len(lines) > 2 else ""
