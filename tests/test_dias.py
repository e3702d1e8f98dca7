"""DIAS: each regularizer against a plain-PyTorch composition of its formula, the ablation
switches, the configuration and a short synthetic training run."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastalign.methods.dias as dias
from fastalign.config import load_config
from fastalign.evaluation import chance_results
from fastalign.methods.dias import DiasOptions, dias_regularizers
from fastalign.tokens import Tokens
from fastalign.training import Trainer

CONFIG = DiasOptions(dim_off_diagonal_weight=0.02, alpha=0.5)


# --------------------------------------------------------------------------- plain formulas
def plain_pool(local, lengths):
    return torch.stack([x[:n].mean(0) for x, n in zip(local, lengths.tolist())])


def plain_dim(a, b, weight, eps=1e-5):
    def standardise(x):
        x = x - x.mean(0)
        return x / torch.sqrt(x.pow(2).mean(0) + eps)

    c = standardise(a).T @ standardise(b) / a.shape[0]
    off = c - torch.diag(c.diagonal())
    return (1 - c.diagonal()).pow(2).sum() + weight * off.pow(2).sum()


def plain_sparse(img, txt, kind, alpha):
    u, v = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    if kind == "inter":
        x = 1 - u @ v.T
        e = (x - x.T).abs()
    else:
        e = ((1 - u @ u.T) - (1 - v @ v.T)).abs()
    n = e.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    rows = e[off].view(n, n - 1)
    mu = rows.mean(1, keepdim=True)
    sigma = rows.std(1, unbiased=False, keepdim=True)
    keep = (e > mu + alpha * sigma) & off
    return (keep * e.pow(2)).sum() / n


def local_embeddings(seed, n=13, regions=7, words=9, d=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    region_embs = torch.randn(n, regions, d, generator=g, dtype=dtype)
    word_embs = torch.randn(n, words, d, generator=g, dtype=dtype)
    region_lengths = torch.randint(1, regions + 1, (n,), generator=g)
    word_lengths = torch.randint(1, words + 1, (n,), generator=g)
    # Loud padding: pooling must ignore it.
    region_embs[torch.arange(regions) >= region_lengths[:, None]] = 1e3
    word_embs[torch.arange(words) >= word_lengths[:, None]] = -1e3
    return region_embs, region_lengths, word_embs, word_lengths


# --------------------------------------------------------------------------- the terms
def test_pooling_is_the_masked_mean():
    region_embs, region_lengths, word_embs, word_lengths = local_embeddings(0)
    torch.testing.assert_close(
        Tokens(region_embs, region_lengths).mean_pooled(), plain_pool(region_embs, region_lengths)
    )
    torch.testing.assert_close(Tokens.dense(word_embs).mean_pooled(), word_embs.mean(1))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_terms_and_gradients_match_plain_formulas(backend, seed):
    region_embs, region_lengths, word_embs, word_lengths = local_embeddings(seed)
    region_embs.requires_grad_()
    word_embs.requires_grad_()
    image = Tokens(region_embs, region_lengths).mean_pooled()
    text = Tokens(word_embs, word_lengths).mean_pooled()
    terms = dias_regularizers(image, text, CONFIG, backend=backend)
    image_plain, text_plain = (
        plain_pool(region_embs, region_lengths),
        plain_pool(word_embs, word_lengths),
    )
    plain = {
        "dim": plain_dim(image_plain, text_plain, CONFIG.dim_off_diagonal_weight),
        "inter": plain_sparse(image_plain, text_plain, "inter", CONFIG.alpha),
        "intra": plain_sparse(image_plain, text_plain, "intra", CONFIG.alpha),
    }
    assert terms.keys() == plain.keys()
    for name, value in terms.items():
        assert value > 0, name
        torch.testing.assert_close(value, plain[name], rtol=1e-9, atol=1e-12, msg=name)
        got = torch.autograd.grad(value, (region_embs, word_embs), retain_graph=True)
        want = torch.autograd.grad(plain[name], (region_embs, word_embs), retain_graph=True)
        for g, w in zip(got, want):
            assert w.abs().max() > 0, name
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10, msg=name)
    total = sum(CONFIG.weight(name) * value for name, value in terms.items())
    expected = 10 * plain["dim"] + 0.05 * plain["inter"] + 0.1 * plain["intra"]
    torch.testing.assert_close(total, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("off", ["dim", "inter", "intra"])
def test_a_zero_weight_skips_its_term(off, monkeypatch):
    config = dataclasses.replace(CONFIG, **{f"{off}_weight": 0.0})
    operator = "dimension_correlation_loss" if off == "dim" else "sparse_spatial_loss"
    original = getattr(dias, operator)

    def guarded(*args, **kwargs):
        if operator == "sparse_spatial_loss" and kwargs["kind"] != off:
            return original(*args, **kwargs)
        raise AssertionError(f"the {off} term was computed with weight 0")

    monkeypatch.setattr(dias, operator, guarded)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    terms = dias_regularizers(image, text, config)
    assert off not in terms and len(terms) == 2


def test_config_values_and_errors():
    config = load_config("dias_f30k")
    assert config.method == "dias" and config.batch_size == 128 and config.epochs == 30
    assert (
        config.options.dim_weight,
        config.options.inter_weight,
        config.options.intra_weight,
    ) == (
        10.0,
        0.05,
        0.1,
    )
    assert load_config("dias_coco").batch_size == 256
    assert load_config(None, ["method=dias", "dias.inter_weight=0"]).options.inter_weight == 0
    with pytest.raises(ValueError, match="dias.nonsense"):
        load_config(None, ["method=dias", "dias.nonsense=1"])
    with pytest.raises(ValueError, match="dias.dim_weight must be >= 0"):
        load_config(None, ["method=dias", "dias.dim_weight=-1"])
    with pytest.raises(ValueError, match="the section of method 'dias'"):
        load_config(None, ["dias.dim_weight=1"])
    with pytest.raises(ValueError, match="method must be one of"):
        load_config(None, ["method=dais"])


# --------------------------------------------------------------------------- training
def test_dias_training_learns_and_logs_every_term(tiny_data, tiny_config, tmp_path):
    config = tiny_config(tiny_data, tmp_path / "dias", "method=dias", epochs=3)
    trainer = Trainer(config, progress=False)
    best = trainer.fit()
    assert best["rsum"] > chance_results(12)["rsum"] + 40
    steps = [row for row in trainer.history if "val_rsum" not in row]
    for name in ("loss_match", "loss_dim", "loss_inter", "loss_intra"):
        assert all(name in row for row in steps), name
    weights = config.options
    for row in steps:
        total = (
            row["loss_match"]
            + weights.dim_weight * row["loss_dim"]
            + weights.inter_weight * row["loss_inter"]
            + weights.intra_weight * row["loss_intra"]
        )
        assert row["loss"] == pytest.approx(total, rel=1e-6)
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert last < first
    header = (tmp_path / "dias" / "log.csv").read_text().splitlines()[0]
    assert {"loss_dim", "loss_inter", "loss_intra"} <= set(header.split(","))


@pytest.mark.parametrize("off", ["dim", "inter", "intra"])
def test_each_switch_removes_its_term_only(off, tiny_data, tiny_config, tmp_path):
    config = tiny_config(tiny_data, tmp_path, "method=dias", f"dias.{off}_weight=0", epochs=1)
    trainer = Trainer(config, progress=False)
    trainer.fit()
    logged = {k[5:] for k in trainer.history[0] if k.startswith("loss_")}
    assert logged == {"match", "dim", "inter", "intra"} - {off}
