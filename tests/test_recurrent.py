"""The memory-lean BiGRU and L2 normalisation of the backbone against PyTorch's own."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastalign.encoders import TextEncoder, l2_normalize
from fastalign.recurrent import bidirectional_gru_mean


def torch_gru_mean(inputs, lengths, gru):
    """nn.GRU on the packed captions, the two directions averaged (the specification)."""
    packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.shape[1])
    return (out[..., : gru.hidden_size] + out[..., gru.hidden_size :]) / 2


def random_case(batch, length, in_dim, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gru = torch.nn.GRU(in_dim, hidden, batch_first=True, bidirectional=True).to(dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length  # the padded size is used by at least one caption
    inputs = torch.randn(batch, length, in_dim, generator=g, dtype=dtype)
    # Loud padding: it must be ignored.
    pad = torch.arange(length) >= lengths[:, None]
    inputs = inputs.masked_fill(pad[..., None], 1e3).requires_grad_()
    return inputs, lengths, gru


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize(
    "batch,length,in_dim,hidden", [(1, 1, 3, 2), (5, 7, 4, 3), (13, 9, 6, 17), (8, 3, 1, 5)]
)
def test_matches_torch_gru(batch, length, in_dim, hidden, dtype, tol):
    inputs, lengths, gru = random_case(batch, length, in_dim, hidden, dtype, seed=batch * length)
    ours = bidirectional_gru_mean(inputs, lengths, gru)
    expected = torch_gru_mean(inputs, lengths, gru)
    torch.testing.assert_close(ours, expected, atol=tol, rtol=tol)
    padded = (torch.arange(length) >= lengths[:, None])[..., None].expand_as(ours)
    assert ours[padded].eq(0).all()

    upstream = torch.randn_like(ours)
    wrt = (inputs, *gru.parameters())
    ours_grads = torch.autograd.grad(ours, wrt, upstream)
    expected_grads = torch.autograd.grad(expected, wrt, upstream)
    for name, a, b in zip(["inputs", *dict(gru.named_parameters())], ours_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol, msg=name)
    assert ours_grads[0][padded[..., :1].expand_as(inputs)].eq(0).all()


class _LeanGRU(torch.nn.Module):
    """bidirectional_gru_mean as a module, so that functional_call can swap its weights."""

    def __init__(self, gru, lengths):
        super().__init__()
        self.gru = gru
        self.lengths = lengths

    def forward(self, x):
        return bidirectional_gru_mean(x, self.lengths, self.gru)


def test_gradcheck_inputs_and_weights():
    inputs, lengths, gru = random_case(4, 5, 3, 2, torch.float64, seed=7)
    inputs = inputs.detach().masked_fill(inputs.abs() > 100, 0.5).requires_grad_()
    module = _LeanGRU(gru, lengths)
    names = [name for name, _ in module.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def lean(x, *weights):
        return torch.func.functional_call(module, dict(zip(names, weights)), (x,))

    assert torch.autograd.gradcheck(lean, (inputs, *weights))


def test_text_encoder_matches_torch_gru_path():
    torch.manual_seed(0)
    encoder = TextEncoder(vocab_size=50, word_dim=6, embed_dim=8)
    lengths = torch.tensor([4, 9, 1, 6])
    captions = torch.randint(1, 50, (4, 9)).masked_fill(torch.arange(9) >= lengths[:, None], 0)
    ours = encoder(captions, lengths)
    expected = F.normalize(
        torch_gru_mean(encoder.embedding(captions), lengths, encoder.gru), dim=-1
    )
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_rejects_other_gru_shapes():
    x, lengths = torch.randn(2, 3, 4), torch.tensor([3, 2])
    for gru in (
        torch.nn.GRU(4, 5, batch_first=True),
        torch.nn.GRU(4, 5, batch_first=True, bidirectional=True, num_layers=2),
        torch.nn.GRU(4, 5, bidirectional=True),
    ):
        with pytest.raises(ValueError, match="gru must be"):
            bidirectional_gru_mean(x, lengths, gru)


def test_l2_normalize_matches_functional():
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    x[1, 2] = 0  # a zero row: clamped by eps, as F.normalize does
    x.requires_grad_()
    ours, expected = l2_normalize(x), F.normalize(x, dim=-1)
    torch.testing.assert_close(ours, expected)
    upstream = torch.randn_like(ours)
    torch.testing.assert_close(
        torch.autograd.grad(ours, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0]
    )
    assert torch.autograd.gradcheck(
        l2_normalize, (torch.randn(3, 5, dtype=torch.float64).requires_grad_(),)
    )
