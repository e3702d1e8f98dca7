"""CDDS: each inferred piece against a plain float64 PyTorch formula written out here (the
UNet, the column Gaussians, the KL matrix, the soft threshold, the mixture, the quantile
map, the four losses), padding that is loud and changes nothing, alpha's gradient, the
ablation switches, the evaluation score and the configs."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from fastalign.config import load_config
from fastalign.data import PairBatch, make_loader
from fastalign.methods import LossContext
from fastalign.methods import cdds as cdds_module
from fastalign.methods.cdds import (
    Cdds,
    CddsModel,
    column_moments,
    gaussian_kl_matrix,
    gaussians_from_moments,
    mixture_gaussians,
    quantile_map,
    related_weights,
    sequence_gaussians,
)
from fastalign.nn import DualPathUNet
from fastalign.tokens import Tokens
from fastalign.training import Trainer

LAPS = ["model.direction=both", "model.aggregate=mean", "model.score_activation=leaky_relu"]
GARBAGE = 1e3  # scale of the values written into padded tokens: loud, yet finite in squares


def generator(seed, case):
    return torch.Generator().manual_seed(1000 * seed + case)


def padded_tokens(g, n, t, d, garbage=GARBAGE):
    """(n, t, d) float64 tokens with random lengths in [1, t] (the longest = t) and padding
    filled with ``garbage``-sized values; returns (tokens, the same with zero padding)."""
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[0] = t
    x = torch.randn(n, t, d, generator=g, dtype=torch.float64)
    valid = torch.arange(t) < lengths[:, None]
    noise = garbage * torch.randn(n, t, d, generator=g, dtype=torch.float64)
    loud = torch.where(valid[..., None], x, noise)
    quiet = torch.where(valid[..., None], x, torch.zeros_like(x))
    return Tokens(loud, lengths), Tokens(quiet, lengths)


def valid_rows(tokens):
    """(sum of lengths, D): the valid tokens, sequence by sequence."""
    return torch.cat([tokens.embs[n, :length] for n, length in enumerate(tokens.lengths.tolist())])


# --------------------------------------------------------------------------- plain formulas
def plain_unet(unet, x, noise):
    """The dual-path UNet with its weights written out, every draw decoded to the end."""

    def lin(layer, v):
        return v @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    h1 = F.gelu(lin(unet.encoder1, x * x.shape[-1] ** 0.5))
    h2 = F.gelu(lin(unet.encoder2, h1))
    draws = (
        [h2] if noise is None else [h2 + unet.sigma_n * noise[:, k] for k in range(noise.shape[1])]
    )
    outputs = []
    for decoder in (unet.semantic, unet.modality):
        decoded = [
            lin(decoder.layer2, F.gelu(lin(decoder.layer1, h) + lin(decoder.skip1, h2)))
            + lin(decoder.skip2, h1)
            for h in draws
        ]
        outputs.append(torch.stack(decoded).mean(0) / x.shape[-1] ** 0.5)
    if unet.residual:
        outputs[0] = outputs[0] + x
    return outputs


def plain_column_gaussian(tokens, eps):
    rows = valid_rows(tokens)
    return rows.mean(0), rows.var(0, correction=0) + eps


def plain_kl(mean_p, var_p, mean_q, var_q):
    return kl_divergence(Normal(mean_p, var_p.sqrt()), Normal(mean_q, var_q.sqrt()))


def plain_related(kl, alpha, tau, temperature):
    p = torch.exp(-kl / tau)
    p = p / p.sum(1, keepdim=True)
    threshold = p.mean(1) + alpha * p.std(1, correction=0)
    return torch.sigmoid((p - threshold[:, None]) / temperature)


def plain_mixture(weights, mean, var, floor):
    """Moment matching by the raw second moment (another route than the module's)."""
    w = weights + floor
    w = w / w.sum(1, keepdim=True)
    mixed = w @ mean
    return mixed, w @ (var + mean**2) - mixed**2


def plain_quantile_map(x, mean_from, var_from, mean_to, var_to):
    """Through the normal CDF and its inverse."""
    q = Normal(mean_from, var_from.sqrt()).cdf(x)
    return Normal(mean_to, var_to.sqrt()).icdf(q)


def plain_laps(images, captions):
    """LAPS's score through the (Ni, Nt, R, L) tensor: leaky-ReLU(0.1) products, max over
    the other side's valid tokens, mean over one's own, both directions summed."""
    (v, v_len), (t, t_len) = images, captions
    s = F.leaky_relu(torch.einsum("ird,twd->itrw", v, t), 0.1)
    v_ok = torch.arange(v.shape[1]) < v_len[:, None]
    t_ok = torch.arange(t.shape[1]) < t_len[:, None]
    per_word = s.masked_fill(~v_ok[:, None, :, None], -math.inf).amax(2)
    t2i = per_word.masked_fill(~t_ok[None], 0).sum(-1) / t_len[None]
    per_region = s.masked_fill(~t_ok[None, :, None, :], -math.inf).amax(3)
    i2t = per_region.masked_fill(~v_ok[:, None], 0).sum(-1) / v_len[:, None]
    return t2i + i2t


def plain_hinge(scores, margin):
    """VSE++ hinge with the hardest negative, distinct images (positives on the diagonal)."""
    diagonal = scores.diag()
    eye = torch.eye(scores.shape[0], dtype=torch.bool)
    cost_c = (margin + scores - diagonal[:, None]).clamp(min=0).masked_fill(eye, 0)
    cost_i = (margin + scores - diagonal[None, :]).clamp(min=0).masked_fill(eye, 0)
    return cost_c.amax(1).sum() + cost_i.amax(0).sum()


def plain_terms(model, options, images, captions, noises, margin, scale):
    """Every CDDS term of one batch, from the formulas above."""
    eps = options.eps
    sem_v, mod_v = plain_unet(model.image_unet, images.embs, noises[0])
    sem_t, mod_t = plain_unet(model.text_unet, captions.embs, noises[1])
    sv, st = Tokens(sem_v, images.lengths), Tokens(sem_t, captions.lengths)
    mean_v, var_v = plain_column_gaussian(sv, eps)
    mean_t, var_t = plain_column_gaussian(st, eps)
    kl = plain_kl(mean_v[:, None], var_v[:, None], mean_t[None], var_t[None])
    d = kl.shape[1]
    weights = plain_related(kl, model.alpha, options.tau, options.temperature / d)
    xm_v, xv_v = plain_mixture(weights, mean_t, var_t, 1e-6)
    xm_t, xv_t = plain_mixture(weights.T, mean_v, var_v, 1e-6)
    x_v = plain_quantile_map(sem_v, mean_v, var_v, xm_v, xv_v + eps)
    x_t = plain_quantile_map(sem_t, mean_t, var_t, xm_t, xv_t + eps)

    def norm(x, lengths):
        return Tokens(F.normalize(x, dim=-1), lengths)

    score = (
        plain_laps(norm(x_v, images.lengths), norm(sem_t, captions.lengths))
        + plain_laps(norm(sem_v, images.lengths), norm(x_t, captions.lengths))
    ) / 2
    terms = {"match": plain_hinge(scale * score, margin)}
    modality = 0.0
    for mod, lengths in ((mod_v, images.lengths), (mod_t, captions.lengths)):
        batch = plain_column_gaussian(Tokens(mod, lengths), eps)
        per_sample = [
            plain_column_gaussian(Tokens(mod[n : n + 1], lengths[n : n + 1]), eps)
            for n in range(mod.shape[0])
        ]
        kls = torch.stack([plain_kl(m, v, *batch) for m, v in per_sample])
        modality = modality + kls.mean() / 2
    terms["modality"] = modality

    def error(approx_v, approx_t):
        total = 0.0
        for a, target in ((approx_v, images), (approx_t, captions)):
            rows = valid_rows(Tokens(a - target.embs, target.lengths))
            total = total + rows.square().sum(1).mean() / 2
        return total

    terms["fusion"] = error(
        model.w_s * sem_v + model.w_m * mod_v, model.w_s * sem_t + model.w_m * mod_t
    )
    terms["sampled"] = error(x_v + mod_v, x_t + mod_t)
    return terms


# --------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("case", range(3))
def test_unet_is_the_plain_formula_and_each_token_stands_alone(case, residual, test_seed):
    g = generator(test_seed, case)
    d, hidden, draws = 7, 5, 3
    loud, quiet = padded_tokens(g, 4, 6, d)
    unet = DualPathUNet(d, hidden, sigma_n=0.3, residual=residual).double()
    noise = torch.randn(4, draws, 6, hidden, generator=g, dtype=torch.float64)
    got = unet(loud.embs, noise)
    want = plain_unet(unet, loud.embs, noise)
    valid = (torch.arange(6) < loud.lengths[:, None])[..., None]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a padded token's value changes no valid token's output
    for a, b in zip(got, unet(quiet.embs, noise)):
        assert torch.equal(torch.where(valid, a, 0), torch.where(valid, b, 0))
    # evaluation: no noise, one pass on H; the modality path can be skipped
    semantic, modality = unet(loud.embs)
    torch.testing.assert_close(semantic, plain_unet(unet, loud.embs, None)[0])
    assert unet(loud.embs, modality=False)[1] is None and modality is not None
    with pytest.raises(ValueError, match="noise must be"):
        unet(loud.embs, noise[:, :, :, :2])
    # packed: only the valid tokens go through the layers; the same outputs there (and the
    # same gradients), 0 at the padding
    x = loud.embs.clone().requires_grad_()
    packed = unet(x, noise, lengths=loud.lengths)
    for a, b in zip(packed, want):
        torch.testing.assert_close(a, torch.where(valid, b, 0), rtol=1e-12, atol=1e-12)
    weights = torch.randn(2, 4, 6, d, generator=g, dtype=torch.float64)
    grad_packed = torch.autograd.grad((weights[0] * packed[0] + weights[1] * packed[1]).sum(), x)
    unpacked = unet(x, noise)
    masked = [torch.where(valid, y, 0) for y in unpacked]
    grad_unpacked = torch.autograd.grad((weights[0] * masked[0] + weights[1] * masked[1]).sum(), x)
    torch.testing.assert_close(grad_packed, grad_unpacked, rtol=1e-12, atol=1e-12)
    assert torch.equal(
        unet(loud.embs, lengths=loud.lengths)[0], unet(quiet.embs, lengths=loud.lengths)[0]
    )
    with pytest.raises(ValueError, match=r"lengths must be \(4,\)"):
        unet(loud.embs, lengths=loud.lengths[:3])
    assert DualPathUNet(1024).hidden == 256  # the default bottleneck: D / 4


def test_unet_parts_depend_on_the_token_at_initialisation(test_seed):
    """L2-normalised tokens reach the layers at unit variance (x sqrt(D)): each output
    column's spread over the tokens is not swamped by the biases (fed as they are, the
    column means were about 6 times the spread at D = 256 and CDDS could not learn)."""
    torch.manual_seed(test_seed)
    g = generator(test_seed, 0)
    x = F.normalize(torch.randn(32, 36, 256, generator=g), dim=-1)
    with torch.no_grad():
        for part in DualPathUNet(256)(x):
            rows = part.reshape(-1, 256)
            ratio = (rows.mean(0).abs() / rows.std(0)).median()
            assert ratio < 1, f"seed {test_seed}: column mean / spread {float(ratio):.2f}"


@pytest.mark.parametrize("case", range(3))
def test_column_and_sequence_gaussians_read_only_the_valid_tokens(case, test_seed):
    g = generator(test_seed, case)
    loud, quiet = padded_tokens(g, 5, 7, 6)
    eps = 1e-6
    mean, var = gaussians_from_moments(column_moments(loud), eps)
    want_mean, want_var = plain_column_gaussian(loud, eps)
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, want_var, rtol=1e-10, atol=1e-12)
    assert torch.equal(column_moments(loud), column_moments(quiet))
    # the moments add over parts of the batch (the gather sums them over ranks)
    split = column_moments(loud.rows(0, 2)) + column_moments(loud.rows(2, 5))
    torch.testing.assert_close(split, column_moments(loud), rtol=1e-12, atol=1e-12)
    means, variances = sequence_gaussians(loud, eps)
    for n in range(5):
        m, v = plain_column_gaussian(loud.rows(n, n + 1), eps)
        torch.testing.assert_close(means[n], m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(variances[n], v, rtol=1e-10, atol=1e-12)
    assert all(
        torch.equal(a, b) for a, b in zip(sequence_gaussians(quiet, eps), (means, variances))
    )


@pytest.mark.parametrize("case", range(3))
def test_kl_matrix_is_torch_distributions_kl(case, test_seed):
    g = generator(test_seed, case)
    d_p, d_q = 6, 9  # not square: every (i, j), no transposition hidden
    mean_p, mean_q = (
        torch.randn(d_p, generator=g, dtype=torch.float64),
        torch.randn(d_q, generator=g, dtype=torch.float64),
    )
    var_p = torch.rand(d_p, generator=g, dtype=torch.float64) + 0.1
    var_q = torch.rand(d_q, generator=g, dtype=torch.float64) + 0.1
    got = gaussian_kl_matrix(mean_p, var_p, mean_q, var_q)
    want = kl_divergence(
        Normal(mean_p[:, None], var_p[:, None].sqrt()), Normal(mean_q[None], var_q[None].sqrt())
    )
    assert got.shape == (d_p, d_q)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(
        gaussian_kl_matrix(mean_p, var_p, mean_p, var_p).diag(),
        torch.zeros(d_p, dtype=torch.float64),
    )
    inputs = tuple(x.clone().requires_grad_() for x in (mean_p, var_p, mean_q, var_q))
    assert torch.autograd.gradcheck(gaussian_kl_matrix, inputs)


@pytest.mark.parametrize("case", range(3))
def test_related_weights_are_the_plain_soft_threshold_and_alpha_gets_its_gradient(case, test_seed):
    g = generator(test_seed, case)
    d = 6
    kl = torch.rand(d, d, generator=g, dtype=torch.float64) * 2
    alpha = (torch.rand(d, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    tau, temperature = 0.3, 0.02
    got = related_weights(kl, alpha, tau, temperature)
    want = plain_related(kl, alpha, tau, temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(
        (got * torch.randn(d, d, generator=g, dtype=torch.float64)).sum(), alpha
    )
    assert (grad != 0).all()  # every column's alpha moves its row's threshold
    kl.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda k, a: related_weights(k, a, tau, temperature), (kl, alpha)
    )


@pytest.mark.parametrize("case", range(3))
def test_mixture_is_the_moment_matched_gaussian(case, test_seed):
    g = generator(test_seed, case)
    d, d_other = 5, 8
    weights = torch.rand(d, d_other, generator=g, dtype=torch.float64)
    weights[0] = 0  # a row with nothing related: the floor mixes every column alike
    mean = torch.randn(d_other, generator=g, dtype=torch.float64)
    var = torch.rand(d_other, generator=g, dtype=torch.float64) + 0.1
    got_mean, got_var = mixture_gaussians(weights, mean, var)
    want_mean, want_var = plain_mixture(weights, mean, var, 1e-6)
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_var, want_var, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_mean[0], mean.mean(), rtol=1e-12, atol=1e-12)
    # a one-hot row is that column's Gaussian
    one_hot = torch.zeros(1, d_other, dtype=torch.float64)
    one_hot[0, 3] = 1
    m, v = mixture_gaussians(one_hot, mean, var, floor=0.0)
    assert torch.allclose(m, mean[3:4]) and torch.allclose(v, var[3:4])
    # (the empty row's derivatives are of order 1 / floor: too steep for finite differences)
    inputs = tuple(x.clone().requires_grad_() for x in (weights[1:], mean, var))
    assert torch.autograd.gradcheck(mixture_gaussians, inputs)


@pytest.mark.parametrize("case", range(3))
def test_quantile_map_carries_a_gaussian_sample_onto_the_target(case, test_seed):
    g = generator(test_seed, case)
    d = 4
    mean_from, mean_to = (
        torch.randn(d, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
    )
    var_from = torch.rand(d, generator=g, dtype=torch.float64) + 0.2
    var_to = torch.rand(d, generator=g, dtype=torch.float64) + 0.2
    sample = mean_from + var_from.sqrt() * torch.randn(20000, d, generator=g, dtype=torch.float64)
    # with the sample's own moments, the image has exactly the target's mean and std
    own_mean, own_var = sample.mean(0), sample.var(0, correction=0)
    mapped = quantile_map(sample, own_mean, own_var, mean_to, var_to)
    torch.testing.assert_close(mapped.mean(0), mean_to, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mapped.std(0, correction=0), var_to.sqrt(), rtol=1e-10, atol=1e-10)
    # with the population's, every point goes to the same quantile of the target
    mapped = quantile_map(sample[:50], mean_from, var_from, mean_to, var_to)
    want = plain_quantile_map(sample[:50], mean_from, var_from, mean_to, var_to)
    torch.testing.assert_close(mapped, want, rtol=1e-8, atol=1e-8)
    inputs = tuple(
        x.clone().requires_grad_() for x in (sample[:3], mean_from, var_from, mean_to, var_to)
    )
    assert torch.autograd.gradcheck(quantile_map, inputs)


# --------------------------------------------------------------------------- the loss terms
def method_and_model(*overrides, d=6):
    config = load_config(
        None,
        # a bottleneck of its own width (not D / 4 = 1 here)
        [
            "method=cdds",
            f"model.embed_dim={d}",
            "cdds.hidden_dim=5",
            "margin=0.2",
            *LAPS,
            *overrides,
        ],
    )
    method = Cdds(config)
    model = method.build_model(10).double()
    return method, model


def batch_of(n):
    index = torch.arange(n)
    return PairBatch(None, None, None, None, index, index)


def recorded_noise(monkeypatch):
    """Records the noise every UNet call receives."""
    seen = []
    original = DualPathUNet.forward

    def forward(self, x, noise=None, modality=True, lengths=None):
        seen.append(noise)
        return original(self, x, noise, modality, lengths)

    monkeypatch.setattr(DualPathUNet, "forward", forward)
    return seen


@pytest.mark.parametrize("case", range(2))
def test_loss_terms_are_the_plain_formulas(case, test_seed, monkeypatch):
    g = generator(test_seed, case)
    method, model = method_and_model("cdds.sigma_n=0.5", "model.score_scale=3.0")
    with torch.no_grad():  # a threshold that is not the same in every column
        model.alpha.copy_(torch.rand(6, generator=g, dtype=torch.float64) * 2)
    # zero padding: the plain quantile map would send garbage to the CDF's tails
    # (padding's influence is the next test's)
    _, images = padded_tokens(g, 5, 4, 6)
    _, captions = padded_tokens(g, 5, 7, 6)
    images = Tokens(images.embs.requires_grad_(), images.lengths)
    noises = recorded_noise(monkeypatch)
    got = method.loss_terms(model, images, captions, LossContext(batch=batch_of(5), epoch=1))
    assert list(got) == ["match", "modality", "fusion", "sampled"]
    assert noises[0].shape == (5, 3, 4, 5) and noises[1].shape == (5, 3, 7, 5)
    want = plain_terms(model, method.options, images, captions, noises, 0.2, 3.0)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=name)
    params = [images.embs, model.alpha, model.w_s, model.w_m, model.image_unet.encoder1.weight]
    total = sum(w * got[k] for k, w in method.loss_weights().items())
    plain_total = sum(w * want[k] for k, w in method.loss_weights().items())
    for a, b in zip(torch.autograd.grad(total, params), torch.autograd.grad(plain_total, params)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_padding_changes_no_term_and_no_gradient(test_seed):
    g = generator(test_seed, 0)
    method, model = method_and_model()
    loud_images, quiet_images = padded_tokens(g, 6, 5, 6)
    loud_captions, quiet_captions = padded_tokens(g, 6, 8, 6)
    results = []
    for images, captions in ((loud_images, loud_captions), (quiet_images, quiet_captions)):
        method.noise_steps = 0  # the same noise for both
        images = Tokens(images.embs.clone().requires_grad_(), images.lengths)
        terms = method.loss_terms(model, images, captions, LossContext(batch=batch_of(6), epoch=1))
        total = sum(w * terms[k] for k, w in method.loss_weights().items())
        params = [images.embs, *model.parameters()]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        results.append((terms, grads))
    (loud_terms, loud_grads), (quiet_terms, quiet_grads) = results
    for name in loud_terms:
        torch.testing.assert_close(
            loud_terms[name], quiet_terms[name], rtol=1e-12, atol=0, msg=name
        )
    for a, b in zip(loud_grads, quiet_grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the padding was read by no statistic: its value is the only difference of the inputs
    assert (loud_images.embs - quiet_images.embs).abs().max() > 100


def test_similarity_is_noiseless_blockwise_and_uses_the_running_statistics(test_seed):
    g = generator(test_seed, 1)
    method, model = method_and_model()
    with torch.no_grad():  # a learned threshold, other in every column
        model.alpha.copy_(torch.rand(6, generator=g, dtype=torch.float64) * 2)
    images, _ = padded_tokens(g, 6, 5, 6)
    captions, _ = padded_tokens(g, 7, 8, 6)
    model.train()
    whole = method.similarity(model, images, captions)
    assert torch.equal(whole, method.similarity(model, images, captions))  # no draws
    torch.testing.assert_close(method.similarity(model, images.rows(2, 5), captions), whole[2:5])
    torch.testing.assert_close(method.similarity(model, images, captions.rows(0, 3)), whole[:, :3])
    # the running statistics: the first batch's, then an EMA at stats_momentum
    first = [torch.rand(6, generator=g, dtype=torch.float64) + 0.1 for _ in range(4)]
    second = [torch.rand(6, generator=g, dtype=torch.float64) + 0.1 for _ in range(4)]
    method._track(model, *first)
    assert torch.equal(model.semantic_mean, torch.stack([first[0], first[2]]))
    method._track(model, *second)
    m = method.options.stats_momentum
    torch.testing.assert_close(
        model.semantic_var,
        m * torch.stack([first[1], first[3]]) + (1 - m) * torch.stack([second[1], second[3]]),
    )
    method._track(model, *(x * math.nan for x in second))  # a non-finite batch changes nothing
    assert int(model.stats_batches) == 2 and model.semantic_var.isfinite().all()
    assert not torch.allclose(method.similarity(model, images, captions), whole)
    # the score is the plain one on the running statistics
    mean, var = model.semantic_mean, model.semantic_var
    sem_v = plain_unet(model.image_unet, images.embs, None)[0]
    sem_t = plain_unet(model.text_unet, captions.embs, None)[0]
    kl = plain_kl(mean[0][:, None], var[0][:, None], mean[1][None], var[1][None])
    w = plain_related(kl, model.alpha, method.options.tau, method.options.temperature / 6)
    xm_v, xv_v = plain_mixture(w, mean[1], var[1], 1e-6)
    xm_t, xv_t = plain_mixture(w.T, mean[0], var[0], 1e-6)
    eps = method.options.eps
    x_v = plain_quantile_map(sem_v, mean[0], var[0], xm_v, xv_v + eps)
    x_t = plain_quantile_map(sem_t, mean[1], var[1], xm_t, xv_t + eps)
    n = F.normalize
    want = (
        plain_laps(
            Tokens(n(x_v, dim=-1), images.lengths), Tokens(n(sem_t, dim=-1), captions.lengths)
        )
        + plain_laps(
            Tokens(n(sem_v, dim=-1), images.lengths), Tokens(n(x_t, dim=-1), captions.lengths)
        )
    ) / 2
    torch.testing.assert_close(
        method.similarity(model, images, captions), want, rtol=1e-8, atol=1e-10
    )


# --------------------------------------------------------------------------- switches
def test_ablation_switches_skip_what_they_switch_off(test_seed, monkeypatch):
    calls = []
    for name in ("related_weights", "quantile_map", "sequence_gaussians"):
        original = getattr(cdds_module, name)
        monkeypatch.setattr(
            cdds_module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    noises = recorded_noise(monkeypatch)
    g = generator(test_seed, 2)
    images, _ = padded_tokens(g, 4, 3, 6)
    captions, _ = padded_tokens(g, 4, 5, 6)

    def run(*overrides):
        calls.clear()
        noises.clear()
        method, model = method_and_model(*overrides)
        terms = method.loss_terms(model, images, captions, LossContext(batch=batch_of(4), epoch=1))
        assert set(terms) == {k for k, w in method.loss_weights().items() if w > 0}
        return method, model, terms, set(calls)

    method, model, terms, seen = run()
    assert seen == {"related_weights", "quantile_map", "sequence_gaussians"}
    assert all(noise is not None for noise in noises)
    method, model, terms, seen = run("cdds.decouple=false")
    assert not isinstance(model, CddsModel) and list(terms) == ["match"] and seen == set()
    assert noises == [] and method.state_dict() == {}
    method, model, terms, seen = run("cdds.noise=false")
    assert noises == [None, None] and method.noise_steps == 0
    assert seen == {"related_weights", "quantile_map", "sequence_gaussians"}
    method, model, terms, seen = run("cdds.sampling=false")
    assert seen == {"sequence_gaussians"} and model.alpha is None
    assert not hasattr(model, "semantic_mean")
    method, model, terms, seen = run("cdds.alpha_m=0")
    assert "modality" not in terms and "sequence_gaussians" not in seen
    method, model, terms, seen = run("cdds.alpha_f=0")
    assert "fusion" not in terms and model.w_s is None and model.w_m is None
    method, model, terms, seen = run("cdds.alpha_f=1")
    assert "sampled" not in terms and "fusion" in terms
    method, model, terms, seen = run("cdds.alpha_s=0")
    assert "match" not in terms
    method, model, terms, seen = run("cdds.alpha_s=0", "cdds.alpha_f=1")
    assert model.alpha is None  # no computed term reads V^x: alpha would get no gradient


def test_no_sampling_matches_the_semantic_parts_directly(test_seed):
    g = generator(test_seed, 3)
    method, model = method_and_model("cdds.sampling=false")
    images, _ = padded_tokens(g, 4, 3, 6)
    captions, _ = padded_tokens(g, 5, 5, 6)
    sem_v = plain_unet(model.image_unet, images.embs, None)[0]
    sem_t = plain_unet(model.text_unet, captions.embs, None)[0]
    want = plain_laps(
        Tokens(F.normalize(sem_v, dim=-1), images.lengths),
        Tokens(F.normalize(sem_t, dim=-1), captions.lengths),
    )
    torch.testing.assert_close(
        method.similarity(model, images, captions), want, rtol=1e-10, atol=1e-12
    )


def test_config_values_and_errors():
    config = load_config("cdds_f30k")
    assert config.method == "cdds" and config.optimizer == "adamw" and config.lr == 2e-4
    assert config.batch_size == 64 and config.epochs == 25
    assert (config.model.direction, config.model.align, config.model.aggregate) == (
        "both",
        "max",
        "mean",
    )
    assert config.model.score_activation == "leaky_relu"
    o = config.options
    assert (o.alpha_s, o.alpha_m, o.alpha_f, o.draws) == (1.0, 0.1, 0.5, 3)
    assert load_config("cdds_coco").options == o
    synthetic, laps = load_config("cdds_synthetic"), load_config("laps_synthetic")
    budget = (
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "lr_decay_epochs",
        "loss",
        "margin",
        "warmup_epochs",
    )
    assert all(getattr(synthetic, key) == getattr(laps, key) for key in budget)
    assert synthetic.model == laps.model
    for name, key in (
        ("no_decoupling", "decouple"),
        ("no_noise", "noise"),
        ("no_sampling", "sampling"),
        ("no_residual", "residual"),
    ):
        ablation = load_config(f"cdds_synthetic_{name}")
        assert ablation.options == dataclasses.replace(synthetic.options, **{key: False})
        same = dataclasses.replace(ablation, name=synthetic.name, options=synthetic.options,
                                   output_dir=synthetic.output_dir)  # fmt: skip
        assert same == synthetic
    for override, error in (
        ("cdds.alpha_f=1.5", "cdds.alpha_f must be <= 1"),
        ("cdds.alpha_m=-1", "cdds.alpha_m must be >= 0"),
        ("cdds.draws=0", "cdds.draws must be >= 1"),
        ("cdds.tau=0", "cdds.tau must be > 0"),
        ("cdds.temperature=0", "cdds.temperature must be > 0"),
        ("cdds.stats_momentum=2", "cdds.stats_momentum must be <= 1"),
        ("cdds.alpha_init=.nan", "cdds.alpha_init must be finite"),
    ):
        with pytest.raises(ValueError, match=error):
            load_config(None, ["method=cdds", override])
    with pytest.raises(ValueError, match="cdds.alpha_s must be > 0 when cdds.decouple is false"):
        load_config(None, ["method=cdds", "cdds.decouple=false", "cdds.alpha_s=0"])
    with pytest.raises(TypeError, match="cdds.noise must be true or false"):
        load_config(None, ["method=cdds", "cdds.noise=3"])


# --------------------------------------------------------------------------- training
def test_alpha_and_the_decoupling_train(tiny_data, tiny_config, tmp_path):
    trainer = Trainer(
        tiny_config(tiny_data, tmp_path, "method=cdds", *LAPS, epochs=1), progress=False
    )
    model = trainer.model
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    batch = next(iter(make_loader(trainer.data.train_set, 16, shuffle=True, seed=0)))
    values = trainer.train_step(batch)
    assert {"loss_match", "loss_modality", "loss_fusion", "loss_sampled"} <= set(values)
    assert model.alpha.grad.abs().max() > 0 and model.w_s.grad.abs() > 0
    trainer.fit()
    for name in (
        "alpha",
        "w_s",
        "w_m",
        "image_unet.semantic.layer1.weight",
        "text_unet.modality.skip2.weight",
    ):
        assert not torch.equal(start[name], dict(model.named_parameters())[name]), name
    assert int(model.stats_batches) == trainer.step  # one statistics update per step
    logs = trainer.method.epoch_logs()
    assert logs["alpha_mean"] == pytest.approx(model.alpha.mean().item())
    assert logs["w_s"] == pytest.approx(model.w_s.item())


def test_the_noise_step_count_is_the_method_state(test_seed):
    method, model = method_and_model()
    g = generator(test_seed, 4)
    images, _ = padded_tokens(g, 3, 3, 6)
    captions, _ = padded_tokens(g, 3, 4, 6)
    context = LossContext(batch=batch_of(3), epoch=1)
    method._noise(images, captions, 6, context)
    state = method.state_dict()
    assert state == {"noise_steps": 1}
    want = method._noise(images, captions, 6, context)
    other, _ = method_and_model()
    other.load_state_dict(state)
    got = other._noise(images, captions, 6, context)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(method._noise(images, captions, 6, context)[0], want[0])
