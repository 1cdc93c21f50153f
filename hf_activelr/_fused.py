"""The fused path: the single-tensor step (base update + ActiveLR rule) compiled into one kernel.

``torch.compile`` (Inductor) turns the readable single-tensor code into one loop per tensor
that reads the parameter, gradient, base state, gain and running sum once and writes them once
(C++/OpenMP on CPU, Triton on GPU). Tensors are flattened and shapes are dynamic, so one
compilation serves every parameter of a variant; Python floats (lr, bias corrections) are
graph inputs, so schedulers changing ``lr`` do not recompile.
"""

from __future__ import annotations

import torch

from . import rule

_COMPILED: dict = {}
# Graphs per variant: dtypes x options (amsgrad, rectified or not, ...) x flat or strided.
_RECOMPILE_LIMIT = 64


def _fused_step_impl(delta_fn, param, grad, gain, grad_sum, tensors, scalars):
    rule.apply_single(param, grad, gain, grad_sum, delta_fn(param, grad, *tensors, **scalars))


def _compiled_for(delta_fn):
    compiled = _COMPILED.get(delta_fn)
    if compiled is None:
        # A distinct code object per variant gives each its own compile cache (Dynamo caches
        # per code object, with a small recompile limit shared by everything that runs it).
        code = _fused_step_impl.__code__.replace(co_name=f"active_{delta_fn.__name__}")
        impl = type(_fused_step_impl)(code, _fused_step_impl.__globals__, code.co_name)
        compiled = torch.compile(impl, dynamic=True, fullgraph=True)
        _COMPILED[delta_fn] = compiled
    return compiled


def _alias(tensor, flat: bool):
    """A plain tensor on the same memory: Dynamo keeps nn.Parameter shapes static and guards
    on a view's base, either of which would compile once per shape or rank."""
    if tensor is None:
        return None
    return tensor.view(-1).detach() if flat else tensor.detach()


def fused_step(delta_fn, param, grad, state, tensors, scalars) -> None:
    """Run ``delta_fn`` and the rule on one parameter as a single compiled kernel."""
    everything = (param, grad, state["gain"], state["grad_sum"], *tensors)
    flat = all(t is None or t.is_contiguous() for t in everything)
    param, grad, gain, grad_sum, *tensors = (_alias(t, flat) for t in everything)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        _compiled_for(delta_fn)(delta_fn, param, grad, gain, grad_sum, tuple(tensors), scalars)
