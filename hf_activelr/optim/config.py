"""`ActiveConfig`: the one statement of the ActiveLR options: their names, types, defaults,
help and validation; and the one parser of ``key=value`` option strings.

Every optimizer class, the wrapper, the presets, the Trainer's ``optim_args``, the sweep's
``name:key=value`` specs and the CLI read the options from here::

    ActiveAdamW(params, lr=1e-3, period=100, lr_high=0.5)          # keyword options
    ActiveAdamW(params, lr=1e-3, config=ActiveConfig(lr_high=0.5, lr_low=0.5, period=100))
    TrainingArguments(optim="active_adamw", optim_args="lr_high=0.5,period=100")

The rule these options steer is stated in docs/algorithm.md and :mod:`hf_activelr.optim.rule`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from ._validation import (  # EPOCH: re-exported, the public name of period="epoch"
    EPOCH,
    GAIN_INCREASES,
    ZERO_SUM_POLICIES,
    check_gain_dtype,
    check_grad_sum_dtype,
    check_period,
    check_real,
    check_significance_reachable,
)

#: The range of a gain and of the factors that move it: six decades either side of the
#: learning rate the user chose. A gain outside it is a learning rate off by more than that
#: (set ``lr`` instead), and values near float32's limits turn gains into 0 or inf within a
#: period (``gain_init=1e-320`` is 0 in float32, ``lr_high=1e308`` is inf): NaN parameters.
#: Nothing published comes near (the paper: lr_high 2.0, lr_low 0.5; the presets: gains
#: within [1/16, 30]).
GAIN_LIMITS = (1e-6, 1e6)
#: The largest z of a test (``significance``, ``pooled``): a normal tail beyond 100 standard
#: deviations is about 1e-2174, no test at all; and ``significance=z`` needs a period of more
#: than z**2 steps.
Z_MAX = 100.0


def parse_period(text: str):
    """A ``period`` from its string: ``"epoch"`` or an int (checked by ActiveConfig)."""
    return EPOCH if text.strip().lower() == EPOCH else int(text)


parse_period.describe = "int or 'epoch'"


def _option(default, kind, help_text: str, parse=None):
    """A field with its type (what the CLI's ``list`` shows), the function that parses its
    ``key=value`` string (the type itself unless given) and its help."""
    return field(default=default,
                 metadata={"type": kind, "parse": parse or kind, "help": help_text})


@dataclass(frozen=True)
class ActiveConfig:
    """The ActiveLR settings of a param group (validated on construction; immutable).

    ``lr_high`` and ``lr_low`` have no default here: each optimizer class supplies the paper's
    values where the authors published them (``ActiveAdamW`` 2.0 / 0.5, ``ActiveRAdam`` and
    ``ActiveAdaBelief`` 0.05 / 0.95), and presets (:mod:`hf_activelr.optim.presets`) supply
    all of them.
    """

    lr_high: float = _option(
        None, float,
        "where a period's sum keeps its sign the gain grows: `gain += lr_high` (additive) or "
        "`gain *= 1 + lr_high` (multiplicative); in [0, 1e6]")
    lr_low: float = _option(
        None, float, "where it flips sign the gain shrinks: `gain *= lr_low`; in [1e-6, 1]")
    period: int | str = _option(
        None, int,
        "optimizer steps between gain updates, or 'epoch' (one epoch, set by the Trainer at "
        "train start, as in the paper)", parse=parse_period)
    gain_min: float | None = _option(
        None, float, "lower bound of the gains, in [1e-6, 1]; None: unbounded (the paper)")
    gain_max: float | None = _option(
        None, float, "upper bound of the gains, in [1, 1e6]; None: unbounded (the paper)")
    gain_increase: str = _option(
        "additive", str, f"how a kept sign grows the gain: one of {GAIN_INCREASES}")
    gain_init: float = _option(
        1.0, float, "the gains' starting value, in [1e-6, 1e6] and within [gain_min, gain_max]")
    significance: float | None = _option(
        None, float,
        "z in (0, 100]: a period's sign counts only where |sum g| > z * sqrt(sum g^2) (else "
        "the gain holds); needs period > z**2; None: every sign counts (the paper)")
    pooled: float | None = _option(
        None, float,
        "z in (0, 100]: a tensor-wide sign test at each boundary: where the tensor's elements "
        "whose counted sign agrees with their previous one outnumber those whose sign flipped by "
        "more than z * sqrt(both), every gain of the tensor grows by 1 + lr_high; where flips "
        "outnumber agreements by as much, every gain shrinks by lr_low (each element's own "
        "change applies too); needs gain_increase='multiplicative'; None: off")
    zero_sum: str = _option(
        "hold", str, f"what a zero (or not significant) sum does: one of {ZERO_SUM_POLICIES}")
    grad_sum_dtype: str | None = _option(
        None, str,
        "storage of the running sums: None (float32; float64 for float64 parameters) or "
        "'bfloat16' (2 bytes less per parameter and sum; every sign kept)")
    gain_dtype: str | None = _option(
        None, str,
        "storage of the gains: None (float32; float64 for float64 parameters) or 'bfloat16' "
        "(2 bytes less per parameter; each new gain rounded to bfloat16; needs "
        "gain_increase='multiplicative', lr_high >= 2**-7, lr_low <= 1 - 2**-7). With "
        "grad_sum_dtype='bfloat16' the lean state: ActiveAdamW keeps 12 bytes per fp32 "
        "parameter")

    def __post_init__(self):
        for name in ("lr_high", "lr_low"):
            if getattr(self, name) is None:
                raise TypeError(
                    f"missing ActiveLR option {name!r}: give it, or use a preset "
                    "(hf_activelr.preset_kwargs), or a class with the paper's values"
                )
        low, high = GAIN_LIMITS
        check_real("lr_high", self.lr_high, low=0.0, high=high)
        check_real("lr_low", self.lr_low, low=low, high=1.0)
        period = check_period(self.period)
        if self.gain_min is not None:
            check_real("gain_min", self.gain_min, low=low, high=1.0)
        if self.gain_max is not None:
            check_real("gain_max", self.gain_max, low=1.0, high=high)
        if self.zero_sum not in ZERO_SUM_POLICIES:
            raise ValueError(
                f"zero_sum must be one of {ZERO_SUM_POLICIES}, got {self.zero_sum!r}")
        if self.gain_increase not in GAIN_INCREASES:
            raise ValueError(
                f"gain_increase must be one of {GAIN_INCREASES}, got {self.gain_increase!r}")
        check_real("gain_init", self.gain_init, low=low, high=high)
        if self.significance is not None:
            check_real("significance", self.significance, low=0.0, low_open=True, high=Z_MAX)
            if period != EPOCH:
                check_significance_reachable(self.significance, period)
        if self.pooled is not None:
            check_real("pooled", self.pooled, low=0.0, low_open=True, high=Z_MAX)
            if self.gain_increase != "multiplicative":
                raise ValueError(
                    "pooled needs gain_increase='multiplicative' (a tensor's gains are scaled "
                    f"by a factor), got {self.gain_increase!r}")
            if self.gain_dtype is not None:
                raise ValueError(
                    f"pooled takes float gains (gain_dtype=None), got {self.gain_dtype!r}: "
                    "its rounding in bfloat16 is not stated or tested yet")
        if self.gain_min is not None and self.gain_init < self.gain_min:
            raise ValueError(f"gain_init must be >= gain_min ({self.gain_min}), got "
                             f"{self.gain_init}")
        if self.gain_max is not None and self.gain_init > self.gain_max:
            raise ValueError(f"gain_init must be <= gain_max ({self.gain_max}), got "
                             f"{self.gain_init}")
        gain_dtype = check_gain_dtype(self.gain_dtype)
        if gain_dtype is not None:
            _check_rounded_gains(gain_dtype, self.gain_increase, self.lr_high, self.lr_low)
        # Normalised forms, as param groups and state dicts hold them.
        normal = {
            "lr_high": float(self.lr_high), "lr_low": float(self.lr_low), "period": period,
            "gain_min": None if self.gain_min is None else float(self.gain_min),
            "gain_max": None if self.gain_max is None else float(self.gain_max),
            "gain_init": float(self.gain_init),
            "significance": None if self.significance is None else float(self.significance),
            "pooled": None if self.pooled is None else float(self.pooled),
            "grad_sum_dtype": check_grad_sum_dtype(self.grad_sum_dtype),
            "gain_dtype": gain_dtype,
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, options: dict, defaults: dict | None = None) -> ActiveConfig:
        """A config from ``defaults`` updated by ``options`` (keyword arguments); an unknown
        key is a TypeError listing the valid ones."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"unknown ActiveLR option(s) {unknown}; valid: {', '.join(OPTION_NAMES)}")
        return cls(**{**(defaults or {}), **options})

    def group_values(self) -> dict:
        """The settings as a param group holds them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> ActiveConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{option: help}``, in declaration order (the CLI's ``list`` prints it)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


#: A gain stored in bfloat16 keeps 8 significant bits: relative spacing between 2**-8 and
#: 2**-7. A change by a factor within 2**-7 of 1 could round back to the same gain.
BF16_RELATIVE_STEP = 2.0**-7


def _check_rounded_gains(gain_dtype: str, gain_increase: str, lr_high: float,
                         lr_low: float) -> None:
    """Refuse settings whose gain changes a bfloat16 gain cannot hold (the change would be
    rounded away, silently freezing the gain): an additive increase (``gain + lr_high`` is
    lost once the gain's spacing exceeds ``2 * lr_high``: at 512 for the paper's 2.0),
    and factors within ``2**-7`` of 1 (each such change moves the gain by at least one
    bfloat16 step)."""
    if gain_increase != "multiplicative":
        raise ValueError(
            f"gain_dtype={gain_dtype!r} needs gain_increase='multiplicative', got "
            f"{gain_increase!r}: an additive increase is rounded away once the gain's "
            "bfloat16 spacing exceeds twice lr_high")
    if lr_high < BF16_RELATIVE_STEP:
        raise ValueError(
            f"with gain_dtype={gain_dtype!r}, lr_high must be >= 2**-7 ({BF16_RELATIVE_STEP}), "
            f"got {lr_high}: a smaller increase can round back to the same bfloat16 gain")
    if lr_low > 1.0 - BF16_RELATIVE_STEP:
        raise ValueError(
            f"with gain_dtype={gain_dtype!r}, lr_low must be <= 1 - 2**-7 "
            f"({1.0 - BF16_RELATIVE_STEP}), got {lr_low}: a smaller decrease can round back to "
            "the same bfloat16 gain")


#: The ActiveLR options, in declaration order: every param group of an Active optimizer
#: carries them.
OPTION_NAMES = tuple(f.name for f in fields(ActiveConfig))
#: The type of each option (what ``hf-activelr list`` shows).
OPTION_TYPES = {f.name: f.metadata["type"] for f in fields(ActiveConfig)}
#: What parses each option's ``key=value`` string: the type, or the field's own parser.
OPTION_PARSERS = {f.name: f.metadata["parse"] for f in fields(ActiveConfig)}


# -- the one key=value parser ---------------------------------------------------------------

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def split_options(text: str | None) -> dict[str, str]:
    """``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}``: the strings ``optim_args`` holds. Spaces
    around keys and values are dropped; an item without ``=`` or a repeated key is an error."""
    pairs: dict[str, str] = {}
    if not text or not text.strip():
        return pairs
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"options {text!r}: expected key=value,key=value, got {item!r}")
        if key in pairs:
            raise ValueError(f"options {text!r}: {key!r} is given twice")
        pairs[key] = value.strip()
    return pairs


def parse_value(key: str, text, kind: type | None = None):
    """The value of option ``key`` from its string ``text``. ``kind`` (bool, int, float, str)
    says what it must be; without one (a peer's option that has no typed default) the string
    reads as None, a boolean, an int, a float, in that order, else stays a string. ``"none"``
    is None for every kind; ``kind`` may also be a field's parser
    (:data:`OPTION_PARSERS`: ``period`` takes ``"epoch"``). Non-strings pass through."""
    if not isinstance(text, str):
        return text
    lowered = text.strip().lower()
    if lowered == "none":
        return None
    if kind is None:
        if lowered in ("true", "false"):
            return lowered == "true"
        for guess in (int, float):
            try:
                return guess(text)
            except ValueError:
                continue
        return text
    if kind is bool:
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"option {key}={text!r}: expected true or false")
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        expected = getattr(kind, "describe", kind.__name__)
        raise ValueError(f"option {key}={text!r}: expected a {expected}") from None
