"""The fused path: the single-tensor step (base update + ActiveLR rule) compiled into one kernel.

``torch.compile`` (Inductor) turns the readable single-tensor code into one loop per tensor
that reads the parameter, gradient, base state, gain and running sum once and writes them once
(C++/OpenMP on CPU, Triton on GPU). Tensors are flattened and shapes are dynamic, so one
compilation serves every parameter of a variant. Float hyperparameters (lr, bias corrections)
enter as 0-d tensors, made once per step for all the parameters that share them, so schedulers
changing ``lr`` do not recompile and each call stays cheap.

Global side effects: none at import (``import hf_activelr`` does not even import
``torch._dynamo``); what follows happens once per variant, at its first fused step, in
:func:`_compiled_for`:

- each variant's step function gets its own copy of the code object, named after the
  variant (``active_<delta_fn>``; ``_chunk`` for the chunked path). Dynamo caches compiled
  graphs per code object, with a recompile limit per code object: sharing one code object,
  every variant (AdamW, SGD, AdaBelief...) would count against the same limit and each call
  would check the others' guards. The copies live only in this module's ``_COMPILED``; no
  function of torch or of the user is renamed or changed.
- the recompile limit is raised to ``_RECOMPILE_LIMIT`` graphs per variant: one variant
  legitimately needs a graph per dtype x option set (amsgrad, rectified, significance...) x
  flat or strided layout, more than Dynamo's default 8, and with ``fullgraph=True`` going past
  the limit is an error, not a fallback to eager. Where ``torch.compile`` takes a
  ``recompile_limit`` of its own (recent torch, e.g. 2.13) it is given there and nothing global
  changes. Older releases have only the process-wide setting,
  ``torch._dynamo.config.recompile_limit`` (``cache_size_limit`` in older ones), read when
  Dynamo compiles inside the compiled call: it is raised once to at least
  ``_RECOMPILE_LIMIT``, never lowered (cheaper than patching the config around every call:
  one call per parameter or chunk, every step).
"""

from __future__ import annotations

import inspect

import torch

from . import rule

_COMPILED: dict = {}
# Graphs per variant: dtypes x options (amsgrad, rectified or not, ...) x flat or strided
# (the module docstring says why the limit is raised, and where).
_RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    """Raise Dynamo's global per-code-object recompile limit to ``_RECOMPILE_LIMIT`` (never
    lower it), for a torch whose ``torch.compile`` has no ``recompile_limit`` argument. The
    setting's name: ``recompile_limit`` in recent torch (2.13 keeps ``cache_size_limit`` as an
    alias), only ``cache_size_limit`` in older ones (2.4, 2.6): use the name that exists."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))


def _fused_step_impl(delta_fn, param, grad, gain, grad_sum, tensors, scalars, alpha,
                     grad_sq_sum=None):
    rule.apply_single(param, grad, gain, grad_sum, delta_fn(param, grad, *tensors, **scalars),
                      alpha, grad_sq_sum)


def _fused_chunk_impl(delta_fn, params, grads, gains, grad_sums, tensor_lists, scalars, alpha,
                      grad_sq_sums=None):
    for index, (param, grad, gain, grad_sum, tensors) in enumerate(
        zip(params, grads, gains, grad_sums, tensor_lists)
    ):
        rule.apply_single(param, grad, gain, grad_sum, delta_fn(param, grad, *tensors, **scalars),
                          alpha, None if grad_sq_sums is None else grad_sq_sums[index])


def _compiled_for(delta_fn, impl=_fused_step_impl, suffix="", dynamic=True, options=None):
    compiled = _COMPILED.get((delta_fn, suffix))
    if compiled is None:
        # A distinct code object per variant gives each its own compile cache (Dynamo caches
        # per code object, with a small recompile limit shared by everything that runs it).
        code = impl.__code__.replace(co_name=f"active_{delta_fn.__name__}{suffix}")
        impl = type(impl)(code, impl.__globals__, code.co_name)
        if "recompile_limit" in inspect.signature(torch.compile).parameters:
            # This function's own limit: the global config stays as it is.
            compiled = torch.compile(impl, dynamic=dynamic, fullgraph=True, options=options,
                                     recompile_limit=_RECOMPILE_LIMIT)
        else:
            compiled = torch.compile(impl, dynamic=dynamic, fullgraph=True, options=options)
            _raise_recompile_limit()  # torch.compile has imported torch._dynamo
        _COMPILED[(delta_fn, suffix)] = compiled
    return compiled


def _alias(tensor, flat: bool):
    """A plain tensor on the same memory: Dynamo keeps nn.Parameter shapes static and guards
    on a view's base, either of which would compile once per shape or rank."""
    if tensor is None:
        return None
    return tensor.view(-1).detach() if flat else tensor.detach()


def _aliases(tensors) -> list:
    """One tensor's group (parameter, gradient, state; None entries allowed) as plain aliases
    (:func:`_alias`): flat where all of them are contiguous, so one graph serves every shape."""
    flat = all(t is None or t.is_contiguous() for t in tensors)
    return [_alias(t, flat) for t in tensors]


def _as_tensors(scalars: dict, names, param: torch.Tensor, cache: dict) -> dict:
    """The per-step floats ``names`` as 0-d tensors on ``param``'s device, in float32 (float64
    for float64 parameters: a float64 scalar would make the whole kernel compute in float64;
    a bfloat16 one would round lr and the bias corrections), shared through ``cache``."""
    converted = dict(scalars)
    dtype = rule.state_dtype(param)
    for name in names:
        value = scalars[name]
        if isinstance(value, float):
            key = (name, value, dtype, param.device)
            tensor = cache.get(key)
            if tensor is None:
                tensor = cache[key] = torch.tensor(value, dtype=dtype, device=param.device)
            converted[name] = tensor
    return converted


def fused_step(delta_fn, param, grad, state, tensors, scalars, step_scalars, cache,
               alpha: float = 1.0, grad_sq_sum=None) -> None:
    """Run ``delta_fn`` and the rule on one parameter as a single compiled kernel.
    ``step_scalars``: names of the floats that change every step; ``cache``: a dict the caller
    keeps for one step, shared by its parameters; ``grad_sq_sum``: the period's squares, where
    the group tests significance."""
    everything = (param, grad, state["gain"], state["grad_sum"], grad_sq_sum, *tensors)
    param, grad, gain, grad_sum, grad_sq_sum, *tensors = _aliases(everything)
    scalars = _as_tensors(scalars, step_scalars, param, cache)
    _compiled_for(delta_fn)(delta_fn, param, grad, gain, grad_sum, tuple(tensors), scalars,
                            alpha, grad_sq_sum)


# Tensors per compiled call on the chunked path: bounds the compile time of one graph, and
# models whose layers repeat (transformers) reuse the same graphs chunk after chunk.
CHUNK = 24


def fused_chunks(delta_fn, params, grads, states, tensor_lists, scalars, step_scalars,
                 cache, alpha: float = 1.0, significance: bool = False, progress=None,
                 indices=None) -> None:
    """The fused step for many parameters sharing the same scalars (the usual case: one param
    group, one step count), ``CHUNK`` tensors per compiled call: one dispatch per chunk instead
    of one per tensor, which is what the per-tensor path spends most of its time on.
    ``progress`` (a list): ``indices`` of the chunks done are appended to it, so that a caller
    whose compilation fails midway knows which tensors were updated."""
    scalars = _as_tensors(scalars, step_scalars, params[0], cache)
    compiled = _compiled_for(delta_fn, _fused_chunk_impl, "_chunk", dynamic=None)
    for start in range(0, len(params), CHUNK):
        stop = start + CHUNK
        compiled(
            delta_fn,
            [p.detach() for p in params[start:stop]],
            [g.detach() for g in grads[start:stop]],
            [s["gain"] for s in states[start:stop]],
            [s["grad_sum"] for s in states[start:stop]],
            [tuple(tensors) for tensors in tensor_lists[start:stop]],
            scalars,
            alpha,
            [s["grad_sq_sum"] for s in states[start:stop]] if significance else None,
        )
        if progress is not None:
            progress.extend(indices[start:stop] if indices is not None
                            else range(start, min(stop, len(params))))


def _boundary_impl(packed, grad_sum, grad_sq_sum, prev_sign, median_bins, lr_high, lr_low, low,
                   high, significance, multiplicative, gain_step, with_stats, pooled=0.0):
    return rule.boundary_tensor(packed, grad_sum, grad_sq_sum, prev_sign, lr_high, lr_low, low,
                                high, significance, multiplicative, gain_step, with_stats,
                                median_bins, pooled)


def fused_boundary(packed, grad_sum, grad_sq_sum, prev_sign, median_bins=None, **scalars):
    """:func:`rule.boundary_tensor` compiled (one loop per tensor instead of some thirty
    eager passes, the boundary's cost on CPU), on flat aliases so that one graph serves every
    shape; the group's settings are constants of the graph (they change rarely)."""
    aliases = _aliases((packed, grad_sum, grad_sq_sum, prev_sign))
    # emulate_precision_casts: Inductor otherwise keeps the float32 value where the code
    # rounds a new gain to bfloat16 (gain_dtype) and reads it again (the statistics), so the
    # kernel's figures would be those of unrounded gains, unlike the eager boundary's.
    compiled = _compiled_for(rule.boundary_tensor, _boundary_impl, "_boundary",
                             options=_boundary_options())
    # median_bins (a tensor, changing from period to period) is an input, not a constant.
    return compiled(*aliases, median_bins, **scalars)


def _boundary_options() -> dict | None:
    """Inductor options of the boundary's graph (the setting exists from torch 2.6 on; older
    releases compile without it, exact for float32 gains)."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "emulate_precision_casts"):
        return {"emulate_precision_casts": True}
    return None


# --- the ActiveLR wrapper's compiled path ----------------------------------------------------
#
# ``ActiveLR(optimizer)`` cannot fold the gain into a step it does not know: it sums the
# gradients and copies the parameters before the wrapped step ("before"), and scales the
# wrapped step's displacement after it ("after"). Each is one compiled loop per tensor,
# ``CHUNK`` tensors per call, on flat aliases.


def _lr_wrapper_before(params, grads, grad_sums, grad_sq_sums, starts):
    """``s += grad`` (``q += grad ** 2`` where given); ``start = p`` (where given)."""
    for index, grad in enumerate(grads):
        grad_sums[index].add_(grad)
        if grad_sq_sums is not None:
            grad_sq_sums[index].addcmul_(grad, grad)
        if starts is not None:
            starts[index].copy_(params[index])


def _lr_wrapper_after(params, starts, gains, alpha):
    """``p = start + (p - start) * g * alpha``: the wrapped step's displacement scaled by the
    decoded gain, in the order the eager wrapper computes it."""
    for param, start, gain in zip(params, starts, gains):
        displacement = (param - start) * rule.decode_gain(gain)
        if alpha != 1.0:
            displacement = displacement * alpha
        param.copy_(displacement + start)


def _chunk_bounds(count: int):
    """``(start, stop)`` of the chunks of ``count`` tensors: ``CHUNK`` at a time, the rest in
    powers of two. A call's list lengths are part of its graph, so a set of tensors that
    changes from step to step (parameters without a gradient, gains that start to count)
    reuses at most ``log2(CHUNK) + 2`` graphs instead of compiling one per length."""
    start = 0
    while count - start >= CHUNK:
        yield start, start + CHUNK
        start += CHUNK
    size = 1 << max(CHUNK.bit_length() - 1, 0)
    while start < count:
        while size > count - start:
            size >>= 1
        yield start, start + size
        start += size


def _flat_aliases(columns):
    """Per tensor (a row of ``columns``, None entries allowed): plain flat aliases where all
    of its tensors are contiguous (one graph serves every shape and rank), else plain
    aliases; DTensors (FSDP2) by their local part."""
    rows = [_aliases([rule.local_tensor(t) for t in row])
            for row in zip(*columns)]
    return [list(column) for column in zip(*rows)] if rows else [[] for _ in columns]


def lr_wrapper_before(params, grads, grad_sums, grad_sq_sums=None, starts=None,
                      progress=None) -> None:
    """The wrapper's work before the wrapped step, compiled: ``grad_sums += grads``
    (``grad_sq_sums += grads ** 2`` where given), and ``starts`` (where given) get the
    parameters' values; one loop per tensor reads each tensor once. ``progress`` (a list):
    the indices of the tensors done are appended to it, chunk by chunk, so that a caller
    whose compilation fails midway finishes the others eagerly."""
    suffix = "_sq" if grad_sq_sums is not None else ""
    suffix += "_copy" if starts is not None else ""
    compiled = _compiled_for(_lr_wrapper_before, _lr_wrapper_before, suffix, dynamic=None)
    none = [None] * len(params)
    columns = _flat_aliases([params, grads, grad_sums, grad_sq_sums or none, starts or none])
    for start, stop in _chunk_bounds(len(params)):
        p, g, s, q, c = (column[start:stop] for column in columns)
        compiled(p, g, s, None if grad_sq_sums is None else q, None if starts is None else c)
        if progress is not None:
            progress.extend(range(start, stop))


def lr_wrapper_after(params, starts, gains, alpha: float = 1.0, progress=None) -> None:
    """The wrapper's work after the wrapped step, compiled: ``p = start + (p - start) *
    decode_gain(gain) * alpha``, one loop per tensor; ``progress`` as in
    :func:`lr_wrapper_before`."""
    compiled = _compiled_for(_lr_wrapper_after, _lr_wrapper_after, "", dynamic=None)
    columns = _flat_aliases([params, starts, gains])
    for start, stop in _chunk_bounds(len(params)):
        p, c, g = (column[start:stop] for column in columns)
        compiled(p, c, g, alpha)
        if progress is not None:
            progress.extend(range(start, stop))
