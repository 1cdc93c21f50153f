"""The ActiveLR rule, written once and composed with every base update.

Wadi, Fredette, Senecal, "Read the Signs: Towards Invariance to Gradient Descent's
Hyperparameter Initialization", arXiv 2301.10133. Per parameter element, at step ``t``:

1. ``s += grad`` (the raw gradient, before any weight-decay term);
2. the base optimizer steps with the element's learning rate ``lr * g``;
3. if ``t % period == 0``: ``g += lr_high`` where the sign of ``s`` agrees with the previous
   period's sum, ``g *= lr_low`` where it flips; the sign of ``s`` is remembered, ``s = 0``.

Beyond the paper (see :mod:`hf_activelr.optim.presets`): ``gain_increase="multiplicative"`` grows
the gain by the factor ``1 + lr_high`` instead of adding ``lr_high``; ``gain_init`` starts the
gains below (or above) 1; ``gain_min`` / ``gain_max`` bound them; ``significance`` counts a
period's sign only where the sum stands out of its own noise (below).

Significance (``significance=z``, off by default): with mini-batches, most elements' period
sums are noise, and a raw sign test is a coin flip on them. The rule then also keeps
``grad_sq_sum``, the period's ``sum(grad ** 2)``; at a boundary a sum counts only where
``|s| > z * sqrt(sum(grad ** 2))``. Under zero-mean noise ``s / sqrt(sum(grad ** 2))`` is a
self-normalised sum, close to a standard normal, so with ``z = 2`` about 5% of pure-noise sums
count (and agree or flip at random), while a consistent gradient counts after a few steps. A
sum that does not count is treated as a zero sum: the gain is held and the older sign kept.

Every base update here is linear in its learning rate, so step 2 is
``p += g * delta`` where ``delta`` is the base update at gain 1 (decoupled weight decay
included, ``p *= 1 - lr * g * weight_decay``).

State layout (per element, ``float32``, or ``float64`` for ``float64`` parameters):

- ``gain``: the gain's magnitude (relative to the group's ``gain_init``, 1 by default: the
  update uses ``gain_init * gain``), with the *sign bit* holding the sign of the last nonzero
  period sum; ``0`` means "no nonzero period sum yet" and reads as gain 1. This keeps the
  previous sign without a third tensor (ActiveAdamW: 16 bytes per fp32 parameter, not 20).
- ``grad_sum``: the running sum ``s`` of the current period; ``bfloat16`` with
  ``grad_sum_dtype="bfloat16"`` (each ``s += grad`` rounded to bfloat16). Only the sum's sign
  is read, and the sum is read and written every step: halving its bytes saves 2 of
  ActiveAdamW's 16 state bytes per parameter and a quarter of the rule's memory traffic
  (ActiveSGD's step moves 28 bytes per element instead of 32; SGD's own, 20). The price: a
  sum grown beyond about 256 times a gradient stops taking that gradient in, and a sum that
  nearly cancels may come out with the other sign or zero, where its sign is noise anyway.
- the lean state, ``gain_dtype="bfloat16"`` (with ``grad_sum_dtype="bfloat16"``: ActiveAdamW
  keeps 12 bytes per fp32 parameter, 14 with ``significance``): the packed gain in bfloat16.
  A gain changes only at boundaries, where it is decoded exactly, grows or shrinks in
  float32 and is rounded to nearest once, when stored (so the bounds hold to within the
  rounding, 2**-9 relative); the sign bit keeps its meaning. bfloat16 keeps 8 significant
  bits, so a change by a factor within 2**-7 of 1 could round back to the same gain, and an
  additive increase is lost once the gain's spacing exceeds twice ``lr_high``: such settings
  are refused (:class:`~hf_activelr.optim.config.ActiveConfig`). Its exponent range is
  float32's: the floor and the bounds are the same.
- ``grad_sq_sum`` (only with ``significance``): the period's ``sum(grad ** 2)``, in the running
  sum's dtype (4 more bytes per fp32 parameter).
- ``prev_sign`` (``int8``, only with ``zero_sum="flip"``): the previous sum's sign, ``0`` for
  a zero sum and ``2`` before the first boundary.

Zero sums (``zero_sum``): a sum that is exactly zero carries no sign (an embedding row whose
token did not occur in a period). ``"hold"`` (default) leaves the gain unchanged and keeps the
older sign when either sum is zero. ``"flip"`` is the authors' reference behaviour
(``prev * s <= 0`` is a flip), so a zero sum shrinks the gain; signs are compared, not their
product, which underflows to zero for tiny sums.

Non-finite gradients: a period sum that is NaN counts as a zero sum (``"hold"``: gain held,
sign kept; ``"flip"``: a flip, as the reference treats zeros) and restarts at the next period;
an infinite sum keeps its sign. The boundary reports how many
sums were not finite (``gain_stats()[i]["nonfinite"]``).

Gains never reach zero or a subnormal: they are floored at the smallest normal number of the
state dtype (or ``gain_min``), so an element can always grow back and never slows the step.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import stats as _stats  # the boundary bins the gains for the statistics in passing
from ._validation import ZERO_SUM_POLICIES

_NO_PREV = 2  # prev_sign value before the first boundary (zero_sum="flip")

ACTIVE_STATE_KEYS = ("gain", "grad_sum", "grad_sq_sum", "prev_sign")


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Gains and sums are kept in float32 at least by default: bf16 cannot add 0.05 to 1
    exactly (``gain_dtype`` / ``grad_sum_dtype`` opt into bfloat16)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def sum_dtype(param: torch.Tensor, grad_sum_dtype: str | None) -> torch.dtype:
    """The running sum's dtype: :func:`state_dtype` unless the group asks for
    ``"bfloat16"``."""
    return state_dtype(param) if grad_sum_dtype is None else getattr(torch, grad_sum_dtype)


def gain_dtype_of(param: torch.Tensor, gain_dtype: str | None) -> torch.dtype:
    """The gains' dtype: :func:`state_dtype` unless the group asks for ``"bfloat16"``."""
    return state_dtype(param) if gain_dtype is None else getattr(torch, gain_dtype)


def init_state(param: torch.Tensor, state: dict, zero_sum: str,
               grad_sum_dtype: str | None = None, significance: bool = False,
               gain_dtype: str | None = None) -> None:
    """Create the Active state of one parameter (gain reads as 1, empty running sums)."""
    state["gain"] = torch.zeros_like(
        param, dtype=gain_dtype_of(param, gain_dtype), memory_format=torch.preserve_format
    )
    state["grad_sum"] = torch.zeros_like(
        param, dtype=sum_dtype(param, grad_sum_dtype), memory_format=torch.preserve_format
    )
    if significance:
        state["grad_sq_sum"] = torch.zeros_like(state["grad_sum"])
    if zero_sum == "flip":
        state["prev_sign"] = torch.full_like(
            param, _NO_PREV, dtype=torch.int8, memory_format=torch.preserve_format
        )


def ensure_state(param: torch.Tensor, state: dict, zero_sum: str,
                 grad_sum_dtype: str | None = None, significance: bool = False,
                 gain_dtype: str | None = None) -> None:
    """Create missing Active state (fresh params, or a state loaded from a plain optimizer)."""
    if "gain" not in state:
        init_state(param, state, zero_sum, grad_sum_dtype, significance, gain_dtype)
        return
    if significance and "grad_sq_sum" not in state:
        # Switched on mid-period (a state saved without it): the squares of the steps already
        # summed are unknown, so the first test compares the sum with part of its noise.
        state["grad_sq_sum"] = torch.zeros_like(state["grad_sum"])
    if zero_sum == "flip" and "prev_sign" not in state:
        # Switching from "hold": recover the remembered sign from the gain's sign bit.
        sign = torch.sign(state["gain"]).to(torch.int8)
        state["prev_sign"] = sign.masked_fill_(sign == 0, _NO_PREV)
        state["gain"].abs_()


def decode_gain(gain: torch.Tensor) -> torch.Tensor:
    """The gain magnitude from the packed state (0, "no sign yet", reads as 1).

    ``|g| + (1 - |sign g|)``: exact (the second term is 0 or 1), and in eager mode on CPU
    twice as fast as ``where(g == 0, 1, |g|)``, whose boolean mask is the slow part."""
    unset = torch.sign(gain).abs_().neg_().add_(1.0)  # 1 where no sign yet, else 0
    return unset.add_(gain.abs())


class GainMultipliers:
    """What the eager multi-tensor paths multiply the updates by, per packed gain tensor.

    :func:`decode_gain` works per element, which on CPU costs more than the update's other
    passes. Most tensors need less: before their first nonzero sum every gain reads 1
    (nothing to multiply: ``None``), and afterwards usually every gain is set (one
    ``gain.abs()``); only a mix (an embedding with unseen rows) is decoded. Which case a
    tensor is in is found with one pass and remembered with the tensor's version counter, so
    any in-place change (a boundary, a load, a user's edit) makes it look again.
    """

    def __init__(self):
        self._kinds = WeakIdKeyDictionary()  # gain tensor -> (its _version, kind)

    def _kind(self, gain: torch.Tensor) -> str:
        seen = self._kinds.get(gain)
        if seen is not None and seen[0] == gain._version:
            return seen[1]
        unset = int(torch.count_nonzero(gain == 0))
        kind = "unset" if unset == gain.numel() else "set" if unset == 0 else "mixed"
        self._kinds[gain] = (gain._version, kind)
        return kind

    def reads_one(self, gain: torch.Tensor) -> bool:
        """Whether every gain of this tensor is unset (reads 1)."""
        return self._kind(gain) == "unset"

    def __call__(self, gains: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per tensor: ``None`` (all gains read 1), or the gain magnitudes."""
        kinds = [self._kind(gain) for gain in gains]
        result: list[torch.Tensor | None] = [None] * len(gains)
        all_set = [i for i, kind in enumerate(kinds) if kind == "set"]
        if all_set:
            for i, magnitude in zip(all_set, torch._foreach_abs([gains[i] for i in all_set])):
                result[i] = magnitude
        for i, kind in enumerate(kinds):
            if kind == "mixed":
                result[i] = decode_gain(gains[i])
        return result


# --- the hot path ------------------------------------------------------------------------


def apply_single(
    param: torch.Tensor,
    grad: torch.Tensor,
    gain: torch.Tensor,
    grad_sum: torch.Tensor,
    delta: torch.Tensor,
    alpha: float = 1.0,
    grad_sq_sum: torch.Tensor | None = None,
) -> None:
    """``s += grad`` (and ``q += grad ** 2`` with significance); ``p += alpha * g * delta``.
    Pure tensor code: also the fused kernel's tail."""
    grad_sum.add_(grad)
    if grad_sq_sum is not None:
        grad_sq_sum.addcmul_(grad, grad)
    # A bfloat16 gain (gain_dtype) is widened first: compiled, addcmul would otherwise round
    # alpha (gain_init) to the gain's dtype (0.3 -> 0.30078), unlike the eager op.
    scale = decode_gain(gain).to(torch.promote_types(gain.dtype, torch.float32))
    param.addcmul_(delta, scale, value=alpha)


def apply_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    gains: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    deltas: list[torch.Tensor],
    alpha: float,
    multipliers: GainMultipliers,
    grad_sq_sums: list[torch.Tensor] | None = None,
) -> None:
    """Multi-tensor :func:`apply_single`; ``multipliers`` (kept by the optimizer) skips the
    per-element decoding where it can."""
    torch._foreach_add_(grad_sums, grads)
    if grad_sq_sums is not None:
        torch._foreach_addcmul_(grad_sq_sums, grads, grads)
    scales = multipliers(gains)
    ones = [i for i, scale in enumerate(scales) if scale is None]
    scaled = [i for i, scale in enumerate(scales) if scale is not None]
    if ones:
        torch._foreach_add_([params[i] for i in ones], [deltas[i] for i in ones], alpha=alpha)
    if scaled:
        torch._foreach_addcmul_([params[i] for i in scaled], [deltas[i] for i in scaled],
                                [scales[i] for i in scaled], value=alpha)


# --- the period boundary -----------------------------------------------------------------

def boundary_tensor(packed, grad_sum, grad_sq_sum, prev_sign, lr_high: float, lr_low: float,
                    low: float, high: float, significance: float, multiplicative: bool,
                    gain_step: float, with_stats: bool = True, median_bins=None,
                    pooled: float = 0.0):
    """One tensor's period boundary, in place (pure tensor code: run eagerly, or compiled by
    the fused path). ``low`` / ``high``: the bounds relative to ``gain_init``; ``gain_step``:
    the additive increase relative to it; ``grad_sq_sum``: the period's squares (None: no
    significance test); ``pooled`` 0: no tensor-wide test (:func:`pooled_factor`);
    ``prev_sign`` None: ``zero_sum="hold"``.

    Returns ``(grew, shrank, nonfinite, min, max, sum, bins, in_bin, in_bin_sum)``: the
    counts, the new (relative) gains' min, max and float64 sum, each one's histogram bin
    (:func:`~hf_activelr.optim.stats.histogram_bin`), and per bin of ``median_bins`` (an
    integer tensor of ``stats.GUESSES`` bins, or None) how many gains fall in it and their
    float64 sum, read once by ``stats.GainStats``; without ``with_stats``, the counts only
    (the rest None: the
    statistics cost more than the update itself).
    """
    # A NaN sum (a NaN gradient in the period) carries no sign: it counts as a zero sum, and
    # the sum restarts below, so one bad gradient does not poison the gain for good. Written
    # with comparisons (False for NaN), not sign().nan_to_num(): compiled for CPU, the NaN
    # test is a scalar loop (comparisons vectorize).
    cur = (grad_sum > 0).to(packed.dtype) - (grad_sum < 0).to(packed.dtype)
    raw = cur
    if grad_sq_sum is not None:
        # Only a sum that stands out of its period's noise carries a sign (module doc). In
        # float32 at least: a compiled kernel computes bfloat16 sums' test in float32, and so
        # must the eager path, for the two to agree on sums at the threshold.
        compute = torch.promote_types(grad_sum.dtype, torch.float32)
        noise = grad_sq_sum.to(compute).sqrt() * significance
        cur = torch.where(grad_sum.to(compute).abs() > noise, cur, 0.0)
        grad_sq_sum.zero_()
    # The new gain is computed in float32 at least and rounded once, when stored: a bfloat16
    # gain (gain_dtype) is decoded exactly, grows or shrinks in float32, then rounds to
    # nearest (the reference rounds the same way; so do compiled kernels, which are built
    # with emulate_precision_casts).
    compute = torch.promote_types(packed.dtype, torch.float32)
    if prev_sign is None:  # hold: the previous sign is the gain's sign bit
        prev = torch.sign(packed)
        agree = (cur != 0) & (prev == cur)
        flip = (cur != 0) & (prev == -cur)
    else:  # flip: the authors' comparison, a zero sum flips
        known = prev_sign != _NO_PREV
        agree = known & (prev_sign * cur > 0)
        flip = known & ~agree
    gain = decode_gain(packed).to(compute)
    factor = None
    if pooled > 0.0:
        # Strict flips: a counted sign opposite to the previous one (under "flip" a zero sum
        # also shrinks its own gain, but is no evidence about the tensor).
        opposite = flip if prev_sign is None else known & (prev_sign * cur < 0)
        factor = pooled_factor(agree.sum().to(compute), opposite.sum().to(compute), pooled,
                               1.0 + lr_high, lr_low)
    # The paper's increase is additive; "multiplicative" (as in Rprop) makes the drift of
    # log(gain) under random signs negative when (1 + lr_high) * lr_low < 1.
    grown = gain * (1.0 + lr_high) if multiplicative else gain + gain_step
    new_gain = torch.where(agree, grown, torch.where(flip, gain * lr_low, gain))
    if factor is not None:
        new_gain = new_gain * factor
    new_gain = new_gain.clamp(low, high).to(packed.dtype)  # rounded as stored
    if prev_sign is None:
        # Keep the older sign where this sum is zero; 0 stays "no sign yet" (gain 1).
        sign = torch.where(cur != 0, cur, prev)
        if factor is not None:
            # A gain without a sign yet that the tensor's factor moves must be stored with
            # one (0 reads as 1): the raw sign of its sum (weak evidence, unlike a coin), or
            # + for a zero sum. Its next counted sign is compared with that.
            unset = (sign == 0) & (factor != 1.0)
            sign = torch.where(unset, torch.where(raw != 0, raw, 1.0), sign)
        packed.copy_(new_gain * sign)
    else:
        packed.copy_(new_gain)
        prev_sign.copy_(cur)
    nonfinite = (~(grad_sum.abs() < math.inf)).sum()  # isfinite, vectorized (see above)
    grad_sum.zero_()
    if not with_stats:
        return agree.sum(), flip.sum(), nonfinite, None, None, None, None, None, None
    bins = _stats.histogram_bin(new_gain)
    in_bin = in_bin_sum = None
    if median_bins is not None:
        masks = [bins == median_bins[k] for k in range(_stats.GUESSES)]
        in_bin = torch.stack([mask.sum() for mask in masks])
        in_bin_sum = torch.stack([torch.where(mask, new_gain, 0.0).sum(dtype=torch.float64)
                                  for mask in masks])
    return (agree.sum(), flip.sum(), nonfinite, new_gain.min(), new_gain.max(),
            new_gain.sum(dtype=torch.float64), bins, in_bin, in_bin_sum)


def pooled_factor(agreed, flipped, z: float, up: float, down: float):
    """The tensor-wide factor of ``pooled=z`` (a 0-d tensor: ``up``, ``down`` or 1), from
    ``agreed`` and ``flipped``: how many of the tensor's elements counted a sign this period
    (significant, with ``significance``) that agrees with their previous one, or is opposite.

    One element's agreement is weak evidence, and with the significance test most elements
    never count a sign at all, so the per-element rule cannot move the bulk of a tensor. The
    tensor's counts pooled are a sign test: under noise an element's counted sign agrees or
    flips at random, so ``agreed - flipped`` is about ``0 +- sqrt(agreed + flipped)``. Where
    agreements exceed flips by more than ``z`` standard deviations, the tensor's elements keep
    moving one way period after period (the learning rate is too small for it): all its gains
    grow by ``up``; where flips exceed agreements by as much, they oscillate (too large): all
    shrink by ``down``; otherwise they hold (no drift under noise). The evidence, and what
    it cannot tell: docs/algorithm.md, "Pooled evidence"."""
    count = agreed + flipped
    margin = z * count.sqrt()
    enough = count > 0
    up, down, one = (count.new_tensor(value) for value in (up, down, 1.0))
    return torch.where(enough & (agreed - flipped > margin), up,
                       torch.where(enough & (flipped - agreed > margin), down, one))


def boundary_scalars(group: dict, dtype: torch.dtype) -> dict:
    """The group's boundary settings as :func:`boundary_tensor` takes them (relative to
    ``gain_init``: the hot path scales by it; the bounds are stated for the real gain)."""
    gain_init = group["gain_init"]
    floor = torch.finfo(dtype).tiny
    return {
        "lr_high": group["lr_high"], "lr_low": group["lr_low"],
        "low": floor if group["gain_min"] is None else max(group["gain_min"] / gain_init, floor),
        "high": math.inf if group["gain_max"] is None else group["gain_max"] / gain_init,
        "significance": group["significance"] or 0.0,
        "pooled": group["pooled"] or 0.0,
        "multiplicative": group["gain_increase"] == "multiplicative",
        "gain_step": group["lr_high"] / gain_init,
    }


def keeps_squares(group: dict) -> bool:
    """Whether the group's parameters keep the period's squared gradients (``grad_sq_sum``),
    which the significance test reads."""
    return group["significance"] is not None


def local_tensor(tensor):
    """A DTensor's local part (sharded parameters: FSDP2); any other value as it is. The
    counts and statistics of a boundary are this rank's; ``distributed.gain_stats`` combines
    them across ranks."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def end_period(states: Iterable[dict], group: dict, boundary=boundary_tensor,
               stats=None) -> dict:
    """Adapt the gains of one param group at a period boundary; returns the change counts.
    ``boundary``: :func:`boundary_tensor` or its compiled twin; ``stats``: a
    ``stats.GainStats``, filled with the new gains' statistics (kept in passing; the
    reductions and the histogram are most of a
    compiled boundary's cost)."""
    # Counts stay tensors until the end: one host sync per boundary, not three per tensor.
    grew = shrank = nonfinite = 0
    states = list(states)
    median_bins = None
    if stats is not None and any(hasattr(s["gain"], "to_local") for s in states):
        stats.guess = None  # sharded gains (FSDP2): a DTensor op with a plain tensor
    if stats is not None and stats.guess is not None:
        median_bins = torch.tensor(stats.guess, dtype=torch.int32, device=stats.device)
    total = 0
    for state in states:
        packed = state["gain"]
        scalars = boundary_scalars(group, packed.dtype)
        outputs = boundary(
            packed, state["grad_sum"],
            state["grad_sq_sum"] if keeps_squares(group) else None,
            state["prev_sign"] if group["zero_sum"] == "flip" else None, **scalars,
            with_stats=stats is not None, median_bins=median_bins)
        agree, flip, bad, low, high, gain_sum, bins, in_bin, in_bin_sum = outputs
        grew = grew + local_tensor(agree)
        shrank = shrank + local_tensor(flip)
        nonfinite = nonfinite + local_tensor(bad)
        total += packed.numel()
        if stats is not None:
            stats.add(bins, low, high, gain_sum, in_bin, in_bin_sum)
    counts = {"grew": int(grew), "shrank": int(shrank), "elements": total,
              "nonfinite": int(nonfinite)}  # total: the whole tensors' (numel of a DTensor)
    if stats is not None:
        stats.grew, stats.shrank = counts["grew"], counts["shrank"]
        stats.nonfinite, stats.changed_elements = counts["nonfinite"], total
    return counts


__all__ = [
    "ACTIVE_STATE_KEYS",
    "boundary_tensor",
    "GainMultipliers",
    "ZERO_SUM_POLICIES",
    "apply_foreach",
    "apply_single",
    "decode_gain",
    "end_period",
    "ensure_state",
    "gain_dtype_of",
    "init_state",
    "keeps_squares",
    "pooled_factor",
    "state_dtype",
    "sum_dtype",
]
