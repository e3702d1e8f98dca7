"""A memory-lean bidirectional GRU over variable-length captions.

``torch.nn.GRU`` on CPU records every gate of every time step for autograd: about 18
floats per hidden unit and token, which makes the caption encoder the largest part of a
training step's memory once the similarity is fused. :func:`bidirectional_gru_mean`
computes the same function with the same parameters (an ``nn.GRU``'s, so checkpoints are
unchanged), keeps only each token's hidden state for the backward, and recomputes the
gates there: one hidden unit's float per token and direction instead of about 18.

Tokens are processed packed, time-major, captions sorted longest first, as
``pack_padded_sequence`` lays them out: step t works on the first ``batch_sizes[t]`` rows,
so the cost follows the real lengths, not the padded ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _PackedGRUDirection(torch.autograd.Function):
    """One direction of a one-layer GRU over packed, time-major tokens.

    x (T, In) tokens, ``batch_sizes`` the rows of each step (non-increasing); returns the
    hidden state of every token (T, H), starting from zeros. Gate order r, z, n and
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)) as in ``torch.nn.GRU``.
    """

    @staticmethod
    def forward(ctx, x, batch_sizes, w_ih, w_hh, b_ih, b_hh):
        hidden = w_hh.shape[1]
        gates_x = torch.addmm(b_ih, x, w_ih.t())  # every step's input projection at once
        states = x.new_empty(x.shape[0], hidden)
        h = x.new_zeros(batch_sizes[0], hidden)
        start = 0
        for rows in batch_sizes:
            h = h[:rows]
            gates_h = torch.addmm(b_hh, h, w_hh.t())
            g = gates_x[start : start + rows]
            r = torch.sigmoid(g[:, :hidden] + gates_h[:, :hidden])
            z = torch.sigmoid(g[:, hidden : 2 * hidden] + gates_h[:, hidden : 2 * hidden])
            n = torch.tanh(torch.addcmul(g[:, 2 * hidden :], r, gates_h[:, 2 * hidden :]))
            h = torch.lerp(n, h, z)  # (1 - z) n + z h
            states[start : start + rows] = h
            start += rows
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(x, states, w_ih, w_hh, b_ih, b_hh)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        x, states, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        batch_sizes = ctx.batch_sizes
        hidden = w_hh.shape[1]
        # The input projections are recomputed, and each step's rows are overwritten with
        # their gradient once used: one (T, 3H) buffer for both.
        grad_gates_x = torch.addmm(b_ih, x, w_ih.t())
        grad_w_hh = torch.zeros_like(w_hh)
        grad_b_hh = torch.zeros_like(b_hh)
        grad_h = x.new_zeros(0, hidden)  # flowing from step t + 1 into step t
        starts = [0]
        for rows in batch_sizes[:-1]:
            starts.append(starts[-1] + rows)
        for t in range(len(batch_sizes) - 1, -1, -1):
            rows, start = batch_sizes[t], starts[t]
            if t > 0:
                h_prev = states[starts[t - 1] : starts[t - 1] + rows]
            else:
                h_prev = x.new_zeros(rows, hidden)
            gates_h = torch.addmm(b_hh, h_prev, w_hh.t())
            g = grad_gates_x[start : start + rows]
            r = torch.sigmoid(g[:, :hidden] + gates_h[:, :hidden])
            z = torch.sigmoid(g[:, hidden : 2 * hidden] + gates_h[:, hidden : 2 * hidden])
            n = torch.tanh(torch.addcmul(g[:, 2 * hidden :], r, gates_h[:, 2 * hidden :]))

            dh = grad_states[start : start + rows].clone()
            dh[: grad_h.shape[0]] += grad_h
            d_n = dh * (1 - z) * (1 - n * n)  # through tanh
            d_r = d_n * gates_h[:, 2 * hidden :] * r * (1 - r)
            d_z = dh * (h_prev - n) * z * (1 - z)
            g[:, :hidden] = d_r
            g[:, hidden : 2 * hidden] = d_z
            g[:, 2 * hidden :] = d_n
            grad_gates_h = torch.cat((d_r, d_z, d_n * r), dim=1)
            grad_h = torch.addmm(dh * z, grad_gates_h, w_hh)
            if t > 0:
                grad_w_hh.addmm_(grad_gates_h.t(), h_prev)
            grad_b_hh += grad_gates_h.sum(0)
        grad_x = grad_gates_x @ w_ih
        grad_w_ih = grad_gates_x.t() @ x
        grad_b_ih = grad_gates_x.sum(0)
        return grad_x, None, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def bidirectional_gru_mean(inputs: Tensor, lengths: Tensor, gru: nn.GRU) -> Tensor:
    """The two directions of ``gru`` over each caption, averaged: (B, L, In) -> (B, L, H).

    Equal to running ``gru`` (one layer, bidirectional, batch_first) on
    ``pack_padded_sequence(inputs, lengths)`` and averaging the two halves of its output;
    positions at or beyond a caption's length are 0. ``lengths`` (B,) in 1..L.
    """
    if gru.num_layers != 1 or not gru.bidirectional or not gru.batch_first or not gru.bias:
        raise ValueError("gru must be a one-layer, bidirectional, batch_first GRU with biases")
    batch, length, _ = inputs.shape
    lengths = lengths.to(inputs.device)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order]
    positions = torch.arange(length, device=inputs.device)
    # Time-major packed layout: (step t, k-th longest caption) for every real token.
    step, rank = (positions[:, None] < sorted_lengths[None, :]).nonzero(as_tuple=True)
    batch_sizes = torch.bincount(step, minlength=int(sorted_lengths[0])).tolist()
    row = order[rank]
    reversed_step = lengths[row] - 1 - step  # the backward direction reads captions reversed
    forward_index = row * length + step
    backward_index = row * length + reversed_step

    flat = inputs.reshape(batch * length, -1)
    states_forward = _PackedGRUDirection.apply(
        flat[forward_index],
        batch_sizes,
        gru.weight_ih_l0,
        gru.weight_hh_l0,
        gru.bias_ih_l0,
        gru.bias_hh_l0,
    )
    states_backward = _PackedGRUDirection.apply(
        flat[backward_index],
        batch_sizes,
        gru.weight_ih_l0_reverse,
        gru.weight_hh_l0_reverse,
        gru.bias_ih_l0_reverse,
        gru.bias_hh_l0_reverse,
    )
    out = inputs.new_zeros(batch * length, gru.hidden_size)
    out = out.index_add(0, forward_index, states_forward, alpha=0.5)
    out = out.index_add(0, backward_index, states_backward, alpha=0.5)
    return out.view(batch, length, gru.hidden_size)
