"""The torch.library plumbing of every operator, written once.

Each operator's ops are listed in ``fastalign._backends.OPERATOR_OPS``; its module gives one
typed fake (meta) kernel per op and, for the differentiable ones, how the gradient is computed.
:func:`define_ops` then

- defines ``fastalign::<op>_triton`` with the schema read off the fake's signature, running the
  launcher of the same name in the operator's Triton module (imported on first call: triton is
  optional);
- registers the fake kernel and the autograd formula on the Triton op and, when fastalign._C is
  loaded, on the compiled op ``fastalign::<op>`` (csrc/ops.cpp declares its schema; the tests
  compare the two);
- returns ``{backend: {op: callable}}`` for "triton", and "cpu" / "cuda" (one compiled op serves
  both: the dispatcher picks the kernel by the device, and resolve_backend allows "cuda" only
  where the build holds the CUDA kernel).

Every backward is once-differentiable: a double backward through it raises instead of silently
missing the second-order terms.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastalign._backends import OPERATOR_OPS


@dataclasses.dataclass(frozen=True)
class Gradient:
    """How the gradient of a forward op is computed.

    ``setup_context`` is as torch.library.register_autograd takes it; ``make_backward(op)``
    returns the backward given the op named ``backward_op`` of the same backend (None when the
    backward needs no op of its own).
    """

    setup_context: Callable
    make_backward: Callable[[Callable | None], Callable]
    backward_op: str | None = None


def _is_exactly_one(grad: Tensor) -> bool:
    """grad == 1, read only where that is free: eagerly on a plain CPU tensor (not under
    tracing, where tensors are fake or functional subclasses; no device sync)."""
    return (
        type(grad) is Tensor
        and grad.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and grad.item() == 1.0
    )


def _saved_gradient_setup_context(ctx, inputs, output) -> None:
    grads = output[1:]
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(*grads)
    ctx.input_count = len(inputs)
    # Unused outputs get None, not zeros: the gradient outputs would cost N x D zero fills.
    ctx.set_materialize_grads(False)


def saved_gradient(op: str) -> Gradient:
    """The loss ops' gradient (as Liger-Kernel's): the forward returns (loss, *grads), where
    grads[i] = dloss/dinputs[i] for an upstream gradient of 1 (empty when the forward ran
    without need_grad), and the backward only scales them by grad_loss, or hands them back
    as they are when grad_loss is exactly 1 (no second copy in memory)."""

    def make_backward(_backward_op: Callable | None) -> Callable:
        def backward(ctx, grad_loss, *_grads_of_grads):
            grads = ctx.saved_tensors
            rest = [None] * (ctx.input_count - len(grads))
            if grad_loss is None:
                return *([None] * len(grads)), *rest
            if grads[0].numel() == 0:
                raise RuntimeError(f"fastalign::{op} ran without need_grad: no gradient kept")
            if _is_exactly_one(grad_loss):
                return *grads, *rest  # autograd copies them if the graph keeps them
            return *(grad_loss * g for g in grads), *rest

        return backward

    return Gradient(_saved_gradient_setup_context, make_backward)


def _define_triton_op(op: str, fake: Callable, module: str) -> None:
    def launch(*args):
        return getattr(importlib.import_module(module), op)(*args)

    schema = torch.library.infer_schema(fake, mutates_args=())
    torch.library.custom_op(f"fastalign::{op}_triton", launch, mutates_args=(), schema=schema)


def define_ops(
    operator: str,
    triton_module: str,
    fakes: dict[str, Callable],
    gradients: dict[str, Gradient] | None = None,
) -> dict[str, dict[str, Callable]]:
    """Define and register the ops of the public ``operator``; see the module docstring.

    Args:
        operator: a key of OPERATOR_OPS, e.g. "region_word_similarity".
        triton_module: the module holding one launcher per op, named like the op.
        fakes: op name -> typed fake kernel, one for every op of the operator.
        gradients: forward op name -> its Gradient; the other ops get no autograd formula.

    Returns:
        {backend: {op name: op}} for "triton" and, with fastalign._C loaded, "cpu" and "cuda".
    """
    names = OPERATOR_OPS[operator]
    if set(fakes) != set(names):
        raise RuntimeError(f"{operator}: fake kernels for {sorted(fakes)}, ops {sorted(names)}")
    suffixes = {"triton": "_triton"}
    for name in names:
        _define_triton_op(name, fakes[name], triton_module)
    if all(hasattr(torch.ops.fastalign, name) for name in names):  # fastalign._C is loaded
        suffixes["cpu"] = ""
    table = {}
    for backend, suffix in suffixes.items():
        ops = {name: getattr(torch.ops.fastalign, name + suffix) for name in names}
        for name in names:
            torch.library.register_fake(f"fastalign::{name}{suffix}")(fakes[name])
        for name, gradient in (gradients or {}).items():
            backward_op = ops[gradient.backward_op] if gradient.backward_op else None
            torch.library.register_autograd(
                f"fastalign::{name}{suffix}",
                once_differentiable(gradient.make_backward(backward_op)),
                setup_context=gradient.setup_context,
            )
        table[backend] = ops
    if "cpu" in table:
        table["cuda"] = table["cpu"]
    return table


def define_loss_ops(
    operator: str, triton_module: str, fake: Callable
) -> dict[str, dict[str, Callable]]:
    """:func:`define_ops` for a loss operator of one forward op with the saved gradient
    (:func:`saved_gradient`); ``fake`` is that op's fake kernel."""
    (forward,) = OPERATOR_OPS[operator]
    return define_ops(operator, triton_module, {forward: fake}, {forward: saved_gradient(forward)})
