"""Checks shared by the tests of the operators that compute their gradient in the forward."""

import torch


def assert_gradient_scaled_and_not_aliased(loss: torch.Tensor, x: torch.Tensor) -> None:
    """The saved gradient of the scalar ``loss`` w.r.t. ``x`` is scaled by the upstream
    gradient, and writing into ``x.grad`` does not reach the copy kept in the graph."""
    (once,) = torch.autograd.grad(loss, x, retain_graph=True)
    once = once.clone()
    (thrice,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
    torch.testing.assert_close(thrice, 3 * once)
    loss.backward(retain_graph=True)
    x.grad.mul_(0)  # must not reach the gradient saved in the graph
    loss.backward()
    torch.testing.assert_close(x.grad, once)
