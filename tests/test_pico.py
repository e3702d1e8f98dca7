"""PICO: each inferred piece against a plain-PyTorch formula (the weighted score, the column
separation, the feedback prototypes, the probability p), the ablation switches, its state
through checkpoints and under 2 gloo processes, its logs, and the style it finds in the
``hard`` synthetic data."""

import csv
import dataclasses
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastalign import distributed
from fastalign.cli import main
from fastalign.config import load_config
from fastalign.data import PairBatch, make_loader
from fastalign.methods import LossContext
from fastalign.methods.pico import Pico, column_separation
from fastalign.nn import FeedbackPrototypes
from fastalign.tokens import Tokens
from fastalign.training import Trainer

LAPS = ["model.direction=both", "model.aggregate=mean", "model.score_activation=leaky_relu"]


def generator(seed, case):
    return torch.Generator().manual_seed(1000 * seed + case)


def state_of(trainer):
    return trainer.method.state_dict()


# --------------------------------------------------------------------------- plain formulas
def plain_weighted_laps(regions, region_lengths, words, word_lengths, p):
    """sum_d p_d v_rd t_wd through the (Ni, Nt, R, L) tensor; leaky-ReLU; max over the other
    side's valid tokens, mean over one's own, both directions summed."""
    s = F.leaky_relu(torch.einsum("ird,d,twd->itrw", regions, p, words), 0.1)
    region_valid = torch.arange(regions.shape[1]) < region_lengths[:, None]  # (Ni, R)
    word_valid = torch.arange(words.shape[1]) < word_lengths[:, None]  # (Nt, L)
    per_word = s.masked_fill(~region_valid[:, None, :, None], -math.inf).amax(2)
    t2i = per_word.masked_fill(~word_valid[None], 0).sum(-1) / word_lengths[None]
    per_region = s.masked_fill(~word_valid[None, :, None, :], -math.inf).amax(3)
    i2t = per_region.masked_fill(~region_valid[:, None], 0).sum(-1) / region_lengths[:, None]
    return t2i + i2t


def plain_separation(image, text, image_index, eps):
    """z through the (N, N, D) interaction tensor."""
    e = image[:, None, :] * text[None, :, :]
    matched = image_index[:, None] == image_index[None, :]
    flat = e.reshape(-1, e.shape[2])
    return (e[matched].mean(0) - e[~matched].mean(0)) / (flat.std(0, correction=0) + eps)


def plain_sinkhorn(x, prototypes, tau, iters):
    """Balanced assignment, log domain: columns to N / K, then rows to 1, ``iters`` times."""
    n, k = x.shape[0], prototypes.shape[0]
    log_q = F.normalize(x, dim=1) @ F.normalize(prototypes, dim=1).T / tau
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) + math.log(n / k)
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    return log_q.exp()


class PlainFeedbackPrototypes:
    """FeedbackPrototypes' semantics written out sample by sample."""

    def __init__(self, prototypes, tau, iters, momentum, beta, feedback_momentum):
        self.prototypes = prototypes.clone()
        self.delta = torch.zeros(prototypes.shape[0], dtype=prototypes.dtype)
        self.last = {}
        self.tau, self.iters, self.momentum = tau, iters, momentum
        self.beta, self.feedback_momentum = beta, feedback_momentum

    def omega(self):
        w = torch.exp(self.beta * (self.delta - self.delta.max()))
        return w / w.sum()

    def step(self, x, ids, losses):
        a = plain_sinkhorn(x, self.prototypes, self.tau, self.iters)
        k = a.shape[1]
        for j in range(k):
            num = den = 0.0
            for n, sample in enumerate(ids.tolist()):
                if sample in self.last:
                    num += a[n, j] * (self.last[sample] - losses[n])
                    den += a[n, j]
            if den > 0:
                mu = self.feedback_momentum
                self.delta[j] = mu * self.delta[j] + (1 - mu) * num / den
        for n, sample in enumerate(ids.tolist()):
            self.last[sample] = float(losses[n])
        omega = self.omega()
        moved = self.prototypes.clone()
        for j in range(k):
            w = torch.stack([a[n, j] * k * (a[n] @ omega) for n in range(len(ids))])
            if w.sum() > 0:
                mean = (w[:, None] * x).sum(0) / w.sum()
                moved[j] = self.momentum * self.prototypes[j] + (1 - self.momentum) * mean
        self.prototypes = moved
        return a


# --------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("case", range(3))
def test_weighted_score_is_the_plain_weighted_laps_score(case, test_seed):
    g = generator(test_seed, case)
    n_images, n_captions, r, length, d = 5, 7, 6, 9, 11  # odd sizes
    regions = torch.randn(n_images, r, d, generator=g, dtype=torch.float64, requires_grad=True)
    words = torch.randn(n_captions, length, d, generator=g, dtype=torch.float64)
    words.requires_grad_()
    region_lengths = torch.randint(1, r + 1, (n_images,), generator=g)
    word_lengths = torch.randint(1, length + 1, (n_captions,), generator=g)
    p = torch.rand(d, generator=g, dtype=torch.float64)
    config = load_config(None, ["method=pico", f"model.embed_dim={d}", *LAPS])
    method = Pico(config)
    model = method.build_model(10)
    method.state.p = p
    got = method.similarity(model, Tokens(regions, region_lengths), Tokens(words, word_lengths))
    want = plain_weighted_laps(regions, region_lengths, words, word_lengths, p)
    message = f"FASTALIGN_TEST_SEED={test_seed}, case {case}"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=message)
    upstream = torch.randn(n_images, n_captions, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (regions, words), upstream)
    want_grads = torch.autograd.grad(want, (regions, words), upstream)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert want_grad.abs().max() > 0, message
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12, msg=message)
    # p = 1 is LAPS's score itself, bit for bit
    method.state.p = torch.ones(d, dtype=torch.float64)
    ones = method.similarity(model, Tokens(regions, region_lengths), Tokens(words, word_lengths))
    assert torch.equal(
        ones, model.similarity(Tokens(regions, region_lengths), Tokens(words, word_lengths))
    )


@pytest.mark.parametrize(("case", "n", "d"), [(0, 7, 5), (1, 13, 11), (2, 2, 3), (3, 31, 17)])
def test_column_separation_matches_the_direct_formula(case, n, d, test_seed):
    g = generator(test_seed, case)
    image = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3
    text = torch.randn(n, d, generator=g, dtype=torch.float64) - 0.2
    # a few pairs share an image (their captions are matched to every copy of it)
    image_index = torch.randint(0, max(2, n - 3), (n,), generator=g)
    if len(image_index.unique()) == 1:
        image_index[0] += 1
    message = f"FASTALIGN_TEST_SEED={test_seed}, case {case}"
    for index in (image_index, None):
        plain_index = torch.arange(n) if index is None else index
        got = column_separation(image, text, index, eps=1e-6)
        want = plain_separation(image, text, plain_index, 1e-6)
        assert want.abs().max() > 0, message
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=message)
    with pytest.raises(ValueError, match="needs an unmatched pair"):
        column_separation(image, text, torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("case", range(2))
def test_feedback_prototypes_match_the_plain_formula(case, test_seed):
    g = generator(test_seed, case)
    k, d, n = 5, 7, 11
    module = FeedbackPrototypes(k, d, tau=0.3, iters=4, momentum=0.8, beta=3.0, seed=case)
    module.double()
    plain = PlainFeedbackPrototypes(module.prototypes, 0.3, 4, 0.8, 3.0, 0.9)
    message = f"FASTALIGN_TEST_SEED={test_seed}, case {case}"
    # ids repeat across steps, so that samples are seen again and the feedback moves
    for step in range(5):
        ids = torch.randperm(17, generator=g)[:n]
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        losses = torch.rand(n, generator=g, dtype=torch.float64) * (1 + step)
        got = module.step(x, ids, losses)
        want = plain.step(x, ids, losses)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=message)
        torch.testing.assert_close(module.delta, plain.delta, rtol=1e-9, atol=1e-12, msg=message)
        torch.testing.assert_close(module.omega(), plain.omega(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(module.prototypes, plain.prototypes, rtol=1e-9, atol=1e-12)
    assert module.delta.abs().min() > 0, message  # every prototype got feedback
    energy = (plain.omega()[:, None] * plain.prototypes.square()).sum(0) / plain.omega().sum()
    torch.testing.assert_close(module.column_energy(), energy, rtol=1e-9, atol=1e-12)
    seen = module.sample_loss.isfinite()
    assert seen.sum() == len(plain.last)
    for sample, loss in plain.last.items():
        assert module.sample_loss[sample].item() == pytest.approx(loss, rel=1e-12)


def test_without_feedback_omega_is_uniform_and_no_loss_is_kept(test_seed):
    g = generator(test_seed, 0)
    module = FeedbackPrototypes(4, 6, feedback=False)
    plain = FeedbackPrototypes(4, 6, feedback=True, beta=0.0)  # beta 0: uniform omega too
    x = torch.randn(9, 6, generator=g)
    module.step(x, torch.arange(9))
    plain.step(x, torch.arange(9), torch.rand(9, generator=g))
    assert torch.equal(module.omega(), torch.full((4,), 0.25))
    assert module.sample_loss.numel() == 0 and module.delta.abs().max() == 0
    torch.testing.assert_close(module.prototypes, plain.prototypes, rtol=1e-6, atol=1e-7)


def test_feedback_prototypes_state_round_trips_with_its_grown_buffer(test_seed):
    g = generator(test_seed, 0)
    module = FeedbackPrototypes(3, 4)
    module.step(torch.randn(5, 4, generator=g), torch.tensor([0, 8, 3, 2, 6]), torch.rand(5))
    restored = FeedbackPrototypes(3, 4, seed=1)
    restored.load_state_dict(module.state_dict())
    for key, value in module.state_dict().items():
        assert torch.equal(value.nan_to_num(-1), restored.state_dict()[key].nan_to_num(-1)), key
    assert restored.sample_loss.shape == (9,)


def one_update(method, image_tokens, caption_tokens, losses, caption_index, image_index):
    n = image_tokens.embs.shape[0]
    batch = PairBatch(
        torch.zeros(n, 1, 1), torch.ones(n), torch.zeros(n, 1), torch.ones(n),
        image_index, caption_index,
    )  # fmt: skip
    method._update(image_tokens, caption_tokens, losses, LossContext(batch=batch, epoch=1))


@pytest.mark.parametrize("style_weight", [1.0, 0.0])
def test_p_is_the_ema_of_the_plain_composition(style_weight, test_seed):
    g = generator(test_seed, int(style_weight))
    d, n, r, length = 9, 13, 5, 6
    overrides = [f"pico.style_weight={style_weight}", "pico.num_prototypes=4"]
    config = load_config(None, ["method=pico", f"model.embed_dim={d}", *overrides])
    method = Pico(config)
    o = config.options
    prototypes = None
    if style_weight:
        prototypes = FeedbackPrototypes(4, d, o.assign_tau, o.sinkhorn_iters, seed=config.seed)
    p = torch.ones(d)
    for step in range(3):
        images = Tokens(
            torch.randn(n, r, d, generator=g), torch.randint(1, r + 1, (n,), generator=g)
        )
        captions = Tokens(
            torch.randn(n, length, d, generator=g), torch.randint(1, length + 1, (n,), generator=g)
        )
        losses = torch.rand(n, generator=g)
        image_index = torch.randint(0, 8, (n,), generator=g)
        caption_index = torch.randperm(20, generator=g)[:n]
        one_update(method, images, captions, losses, caption_index, image_index)
        gv = torch.stack([x[:k].mean(0) for x, k in zip(images.embs, images.lengths)]).double()
        gt = torch.stack([x[:k].mean(0) for x, k in zip(captions.embs, captions.lengths)]).double()
        z = plain_separation(gv, gt, image_index, o.eps)
        logits = (z - z.mean()) / (z.std(correction=0) + o.eps)
        if prototypes is not None:
            prototypes.step((gv - gt).float(), caption_index, losses)
            s = prototypes.column_energy().double()
            logits = logits - style_weight * (s - s.mean()) / (s.std(correction=0) + o.eps)
        p = 0.9 * p + 0.1 * torch.sigmoid(logits / o.tau_p).float()
        message = f"FASTALIGN_TEST_SEED={test_seed}, step {step}"
        torch.testing.assert_close(method.state.p, p, rtol=1e-5, atol=1e-6, msg=message)
    assert (method.state.prototypes is None) == (style_weight == 0)
    assert p.min() < 0.9 and p.std() > 0.01  # p moved, and not uniformly


def test_config_values_and_errors():
    config = load_config("pico_f30k")
    assert config.method == "pico" and config.batch_size == 128 and config.epochs == 25
    assert (config.model.direction, config.model.aggregate) == ("both", "mean")
    assert config.model.score_activation == "leaky_relu"
    assert config.options.num_prototypes == 32 and config.options.beta == 10.0
    assert load_config("pico_coco").batch_size == 256
    synthetic, laps = load_config("pico_synthetic"), load_config("laps_synthetic")
    budget = ("epochs", "batch_size", "lr", "lr_decay_epochs", "loss", "margin", "warmup_epochs")
    assert all(getattr(synthetic, key) == getattr(laps, key) for key in budget)
    assert synthetic.model == laps.model
    switches = {
        "pico_synthetic_no_weights": ("semantic_weights", False),
        "pico_synthetic_no_prototypes": ("style_weight", 0.0),
        "pico_synthetic_uniform_omega": ("feedback", False),
    }
    for name, (key, value) in switches.items():
        ablation = load_config(name)
        assert ablation.options == dataclasses.replace(synthetic.options, **{key: value})
        assert dataclasses.replace(ablation, name=synthetic.name, options=synthetic.options,
                                   output_dir=synthetic.output_dir) == synthetic  # fmt: skip
    for override, error in (
        ("pico.num_prototypes=0", "pico.num_prototypes must be >= 1"),
        ("pico.tau_p=0", "pico.tau_p must be > 0"),
        ("pico.p_momentum=1.5", "pico.p_momentum must be <= 1"),
        ("pico.style_weight=-1", "pico.style_weight must be >= 0"),
        ("pico.assign_tau=0", "pico.assign_tau must be > 0"),
    ):
        with pytest.raises(ValueError, match=error):
            load_config(None, ["method=pico", override])
    with pytest.raises(TypeError, match="pico.feedback must be true or false"):
        load_config(None, ["method=pico", "pico.feedback=3"])


# --------------------------------------------------------------------------- training
def test_p_one_gives_laps_step_for_step_and_p_is_one_in_the_warm_up(
    tiny_data, tiny_config, tmp_path
):
    def run(out, *overrides):
        trainer = Trainer(tiny_config(tiny_data, tmp_path / out, *LAPS, *overrides), progress=False)
        trainer.fit()
        return [row["loss"] for row in trainer.history if "val_rsum" not in row], trainer

    laps, laps_trainer = run("laps")
    off, _ = run("off", "method=pico", "pico.semantic_weights=false")
    on, on_trainer = run("on", "method=pico")
    assert off == laps
    first_epoch = len(laps) // 2
    assert on[:first_epoch] == laps[:first_epoch]  # p = 1 during the warm-up epoch
    assert on[first_epoch + 1 :] != laps[first_epoch + 1 :]
    assert on_trainer.method.state.p.min() < 0.9


def test_ablation_switches_skip_what_they_switch_off(tiny_data, tiny_config, tmp_path, monkeypatch):
    calls = []
    original_step = FeedbackPrototypes.step
    monkeypatch.setattr(
        FeedbackPrototypes, "step", lambda self, *a: calls.append("step") or original_step(self, *a)
    )
    original_update = Pico._update
    monkeypatch.setattr(
        Pico, "_update", lambda self, *a: calls.append("update") or original_update(self, *a)
    )

    def run(out, *overrides):
        calls.clear()
        trainer = Trainer(
            tiny_config(tiny_data, tmp_path / out, "method=pico", *overrides), progress=False
        )
        trainer.fit()
        return trainer, set(calls)

    trainer, seen = run("off", "pico.semantic_weights=false")
    assert seen == set() and torch.equal(trainer.method.state.p, torch.ones(32))
    trainer, seen = run("no_prototypes", "pico.style_weight=0")
    assert seen == {"update"} and trainer.method.state.prototypes is None
    assert set(trainer.method.state_dict()) == {"p"}
    trainer, seen = run("uniform", "pico.feedback=false")
    prototypes = trainer.method.state.prototypes
    assert seen == {"update", "step"} and prototypes.sample_loss.numel() == 0
    assert torch.equal(prototypes.omega(), torch.full((32,), 1 / 32))


def test_resume_restores_every_piece_of_state_exactly(tiny_data, tiny_config, tmp_path):
    # three epochs: the samples come back in the third, so the feedback has moved
    straight = Trainer(
        tiny_config(tiny_data, tmp_path / "a", "method=pico", epochs=3), progress=False
    )
    straight.fit()
    Trainer(tiny_config(tiny_data, tmp_path / "b", "method=pico", epochs=2), progress=False).fit()
    resumed = Trainer(
        tiny_config(tiny_data, tmp_path / "b", "method=pico", epochs=3), resume=True, progress=False
    )
    resumed.fit()
    want, got = state_of(straight), state_of(resumed)
    assert set(want) == {"p", "prototypes.prototypes", "prototypes.delta", "prototypes.sample_loss"}
    for key, value in want.items():
        assert torch.equal(value.nan_to_num(-1), got[key].nan_to_num(-1)), key
    assert want["prototypes.delta"].abs().min() > 0
    assert want["prototypes.sample_loss"].isfinite().all()  # every training pair seen


def test_p_is_logged_every_epoch_and_eval_names_the_style_columns(
    tiny_data, tiny_config, tmp_path, capsys
):
    trainer = Trainer(tiny_config(tiny_data, tmp_path, "method=pico"), progress=False)
    trainer.fit()
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("epoch ")]
    assert len(lines) == 2 and all("p_min" in x and "p_max" in x for x in lines), lines
    with open(tmp_path / "log.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["val_rsum"]]
    p = trainer.method.state.p
    assert float(rows[0]["p_min"]) == float(rows[0]["p_max"]) == 1.0  # the warm-up epoch
    assert float(rows[1]["p_min"]) == pytest.approx(p.min().item())
    assert float(rows[1]["p_mean"]) == pytest.approx(p.mean().item())
    assert float(rows[1]["p_max"]) == pytest.approx(p.max().item())
    if trainer.tensorboard is not None:
        accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
        events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        assert "method/p" in events.Tags()["histograms"]
        assert "method/p_mean" in events.Tags()["scalars"]
    main(["eval", str(tmp_path / "last.pt"), "--split", "dev"])
    out = capsys.readouterr().out
    lowest = torch.argsort(p, stable=True)[:10].tolist()
    assert "columns with the most style (lowest p): " + f"{lowest[0]} ({p[lowest[0]]:.3f})" in out


# --------------------------------------------------------------------------- 2 processes
def _state_worker(rank, port, config, out):
    import os

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    trainer = Trainer(config, progress=False)
    torch.save(_feedback_steps(trainer), out / f"rank{rank}.pt")
    distributed.cleanup()


def _feedback_steps(trainer):
    """Past the warm-up: batches 0, 1, then 0 again (its pairs seen before: feedback);
    returns the losses and the method's state after every step."""
    trainer.epoch = 1
    loader = make_loader(trainer.data.train_set, trainer.config.batch_size, shuffle=True, seed=0)
    batches = [batch for _, batch in zip(range(2), loader)]
    result = []
    for batch in (batches[0], batches[1], batches[0]):
        values = trainer.train_step(batch)
        result.append((values, state_of(trainer)))
    return result


def test_two_processes_hold_the_same_state_as_one(tiny_data, tiny_config, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny_config(tiny_data, tmp_path / "ddp", "method=pico", "grad_clip=0")
    mp.spawn(_state_worker, args=(port, config, tmp_path), nprocs=2)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    one = _feedback_steps(
        Trainer(
            tiny_config(tiny_data, tmp_path / "one", "method=pico", "grad_clip=0"), progress=False
        )
    )
    for step, ((_, state0), (_, state1), (values, want)) in enumerate(zip(rank0, rank1, one)):
        for key in want:
            # every rank holds the very same state ...
            assert torch.equal(state0[key].nan_to_num(-1), state1[key].nan_to_num(-1)), (step, key)
            # ... that of one process on the global batch, up to float32 sums in another order
            torch.testing.assert_close(
                state0[key], want[key], rtol=1e-4, atol=1e-5, equal_nan=True, msg=f"{step} {key}"
            )
        assert rank0[step][0]["loss"] == pytest.approx(values["loss"], rel=1e-4)
    assert one[-1][1]["prototypes.delta"].abs().max() > 0  # the feedback moved


# --------------------------------------------------------------------------- hard data
# filled in below
