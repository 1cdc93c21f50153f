"""Which path a step takes, and the compiled path's fall back: one place for the variants'
step, the period boundary and the wrapper's two passes.

- :func:`choose`: ``fused=True`` compiles; ``foreach=False`` takes the single-tensor code;
  ``foreach=True`` the foreach code; neither (the default) compiles where it wins
  (:func:`auto_fused`), else foreach. A compiled path that failed stays off for good.
- :func:`run`: the compiled calls over batches of tensors, each reporting the tensors it
  finished; on the first failure, one warning (:func:`failed`) and the eager code the kernels
  are compiled from for the tensors not finished: the same results.
- :func:`or_eager`: one compiled call with its eager twin behind it (the boundary, per
  tensor).
"""

from __future__ import annotations

import warnings

FUSED, FOREACH, SINGLE = "fused", "foreach", "single"

#: Parameter elements from which the default (``fused=None, foreach=None``) compiles the step
#: on CPU, where compiling wins (README, "Benchmarks", has the figures): below it the
#: compiled kernels' OpenMP threads compete with torch's within a training step, and the
#: compilation on the first step is not repaid by a small model's short runs.
AUTO_FUSED_MIN_ELEMENTS = 10_000_000


def auto_fused(params) -> bool:
    """Whether the default path compiles: on CUDA with Triton always; on CPU from
    :data:`AUTO_FUSED_MIN_ELEMENTS` parameter elements; never elsewhere (MPS, XLA...)."""
    if not params:
        return False
    device = params[0].device
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return False
        return has_triton()
    if device.type == "cpu":
        return sum(p.numel() for p in params) >= AUTO_FUSED_MIN_ELEMENTS
    return False


def choose(fused, foreach, runtime, params) -> str:
    """The path (:data:`FUSED`, :data:`FOREACH` or :data:`SINGLE`) for the ``fused`` /
    ``foreach`` options; ``runtime``: the optimizer's ``_mixin.Runtime`` (where a failure and
    the default's choice, made once over ``params()``, are kept)."""
    if runtime.fused_error is None:
        if fused:
            return FUSED
        if fused is None and foreach is None:
            if runtime.auto_fused is None:
                runtime.auto_fused = auto_fused(params())
            if runtime.auto_fused:
                return FUSED
    return SINGLE if foreach is False else FOREACH


def failed(owner, error: Exception) -> None:
    """The compiled path could not compile or run (no C++ compiler or Triton, a compiler
    error, an unsupported dtype...): ``owner`` (an Active optimizer) takes the eager path from
    now on, after one warning naming the cause."""
    owner._runtime.fused_error = error
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    warnings.warn(
        f"{type(owner).__name__}: the compiled (fused) step failed "
        f"({type(error).__name__}: {first_line}); "
        "this optimizer uses the foreach path from now on (same results, slower; pass "
        "fused=False to choose it and silence this warning)",
        RuntimeWarning, stacklevel=5,
    )


def run(owner, batches: list[list[int]], compiled, eager) -> None:
    """``compiled(batch, progress)`` for each batch of tensor indices, appending to
    ``progress`` the indices it finished (a compilation fails before its kernel runs); on the
    first exception, :func:`failed` and ``eager(indices)`` for every index not finished."""
    done: list[int] = []
    try:
        for batch in batches:
            progress: list[int] = []
            try:
                compiled(batch, progress)
            finally:
                done.extend(progress)
    except Exception as error:  # noqa: BLE001 - any compiler failure
        failed(owner, error)
        finished = set(done)
        eager([i for batch in batches for i in batch if i not in finished])


def or_eager(owner, compiled, eager):
    """``compiled`` while the compiled path works, else (and from its first failure on, after
    :func:`failed`) ``eager``, called with the same arguments."""

    def call(*args, **kwargs):
        if owner._runtime.fused_error is None:
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                failed(owner, error)
        return eager(*args, **kwargs)

    return call
