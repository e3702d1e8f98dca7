"""fastalign.distributed: 2 gloo processes on the CPU against one process on the global batch.

The two-process runs happen once per module (one ``spawn`` of 2 workers running every
scenario) and write their results under a temporary directory; the tests compare them
with the plain losses of :mod:`fastalign.losses` computed here on the whole batch.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from _helpers.distributed import WORLD, as_torchrun_rank, free_port, spawn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import fastalign
from fastalign import distributed as fd
from fastalign.cli import main
from fastalign.losses import hinge_triplet_loss, info_nce_loss, positives_from_image_index
from fastalign.tokens import Tokens

FEAT, DIM, VOCAB = 5, 8, 17
# 8 pairs, rank 0 holds pairs 0-3 and rank 1 pairs 4-7. Image 2 is twice on rank 0 and
# image 0 on both ranks. Padded sizes differ between the ranks: rank 0 has R=4 and L=6,
# rank 1 R=5 and L=4; the whole batch R=5 and L=6.
IMAGE_INDEX = [0, 1, 2, 2, 3, 5, 0, 4]
REGION_COUNTS = [3, 4, 2, 5, 3, 4]  # per image
WORD_LENGTHS = [3, 6, 2, 5, 4, 2, 3, 4]  # per caption
SCENARIOS = {
    "hinge_max": dict(
        loss="hinge", margin=0.2, max_violation=True, sim=dict(direction="t2i", aggregate="mean")
    ),
    "hinge_sum": dict(
        loss="hinge", margin=0.5, max_violation=False, sim=dict(direction="both", align="max")
    ),
    "infonce": dict(
        loss="infonce", temperature=0.1, sim=dict(direction="both", align="lse", aggregate="mean")
    ),
}


# --------------------------------------------------------------------------- shared setup
class TinyModel(nn.Module):
    """Region features -> Linear; word ids -> Embedding + Linear; L2-normalised tokens,
    returned as (image Tokens, caption Tokens) like :class:`fastalign.models.MatchingModel`."""

    def __init__(self) -> None:
        super().__init__()
        self.region_proj = nn.Linear(FEAT, DIM)
        self.word_embedding = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.word_proj = nn.Linear(DIM, DIM)

    def forward(
        self, region_feats: Tensor, region_lengths: Tensor, word_ids: Tensor, word_lengths: Tensor
    ) -> tuple[Tokens, Tokens]:
        """(B, R, FEAT), (B,), (B, L), (B,) -> regions (B, R, DIM), words (B, L, DIM)."""
        regions = F.normalize(self.region_proj(region_feats), dim=-1)
        words = F.normalize(self.word_proj(self.word_embedding(word_ids)), dim=-1)
        return Tokens(regions, region_lengths), Tokens(words, word_lengths)


def make_model() -> TinyModel:
    torch.manual_seed(1)
    return TinyModel().double()


def make_batch(lo: int = 0, hi: int = len(IMAGE_INDEX)) -> dict[str, Tensor]:
    """Pairs lo..hi-1 of the fixed global batch, cropped to their own padded sizes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(REGION_COUNTS), max(REGION_COUNTS), FEAT, generator=g)
    word_ids = torch.randint(1, VOCAB, (len(WORD_LENGTHS), max(WORD_LENGTHS)), generator=g)
    word_lengths = torch.tensor(WORD_LENGTHS)
    word_ids[torch.arange(word_ids.shape[1]) >= word_lengths[:, None]] = 0
    index = torch.tensor(IMAGE_INDEX)[lo:hi]
    region_lengths = torch.tensor(REGION_COUNTS)[index]
    word_lengths = word_lengths[lo:hi]
    return dict(
        region_feats=images[index, : int(region_lengths.max())].double(),
        region_lengths=region_lengths,
        word_ids=word_ids[lo:hi, : int(word_lengths.max())],
        word_lengths=word_lengths,
        image_index=index,
    )


def encode(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tokens, Tokens]:
    """The model's (image, caption) tokens of a batch from :func:`make_batch`."""
    return model(
        batch["region_feats"], batch["region_lengths"], batch["word_ids"], batch["word_lengths"]
    )


def region_word_scores(images: Tokens, captions: Tokens, **options) -> Tensor:
    """:func:`fastalign.region_word_similarity` on tokens: a similarity_fn of the losses."""
    return fastalign.region_word_similarity(
        images.embs, captions.embs, images.lengths, captions.lengths, **options
    )


def similarity(scenario: dict):
    return functools.partial(region_word_scores, **scenario["sim"])


def loss_options(scenario: dict) -> dict:
    keys = ("loss", "margin", "max_violation", "temperature")
    return {k: scenario[k] for k in keys if k in scenario}


def plain_loss(scenario: dict, scores: Tensor, image_index: Tensor) -> Tensor:
    """The single-process losses of fastalign.losses on a (B, B) matrix."""
    positives = positives_from_image_index(image_index)
    if scenario["loss"] == "hinge":
        return hinge_triplet_loss(
            scores, scenario["margin"], scenario["max_violation"], positive_mask=positives
        )
    return info_nce_loss(scores, scenario["temperature"], positive_mask=positives)


def single_process_reference(scenario: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain loss and parameter gradients of one process on the whole batch."""
    model, batch = make_model(), make_batch()
    scores = similarity(scenario)(*encode(model, batch))
    loss = plain_loss(scenario, scores, batch["image_index"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- worker side
def _distributed_step(scenario: dict, rank: int) -> dict:
    """One DDP step on this rank's half of the batch."""
    per_rank = len(IMAGE_INDEX) // WORLD
    batch = make_batch(rank * per_rank, (rank + 1) * per_rank)
    model = DistributedDataParallel(make_model())
    images, captions = encode(model, batch)  # Tokens through DDP's forward
    share = fd.global_batch_loss(
        images, captions, batch["image_index"], similarity(scenario), **loss_options(scenario)
    )
    share.backward()
    total = share.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    return dict(share=share.detach(), loss=total / WORLD, grads=grads)


def _gather_checks(rank: int) -> dict:
    """all_gather_with_grad / gather_tokens gradients and the global_batch_scores layout."""
    out = {}
    x = (torch.arange(6.0).reshape(3, 2) + 10 * rank).requires_grad_()
    y = fd.all_gather_with_grad(x)
    weight = torch.arange(12.0).reshape(6, 2) * (rank + 1)  # a different loss on each rank
    (y * weight).sum().backward()
    out["all_gather"], out["all_gather_grad"] = y.detach(), x.grad

    tokens = torch.full((2, 3 + rank, 4), rank + 1.0, requires_grad=True)
    result = fd.gather_tokens(Tokens(tokens, torch.tensor([1, 3 + rank])))
    out["tokens_type"] = type(result).__name__
    gathered, lengths = result
    gathered.pow(2).sum().backward()
    out["tokens"], out["token_lengths"], out["tokens_grad"] = (
        gathered.detach(),
        lengths,
        tokens.grad,
    )

    per_rank = len(IMAGE_INDEX) // WORLD
    batch = make_batch(rank * per_rank, (rank + 1) * per_rank)
    with torch.no_grad():
        images, captions = encode(make_model(), batch)
        rows, cols, offset = fd.global_batch_scores(
            images, captions, similarity(SCENARIOS["hinge_sum"])
        )
    out["rows"], out["cols"], out["offset"] = rows, cols, offset
    return out


def _error_checks(rank: int) -> dict:
    """Mismatched shapes raise on every rank, and the group keeps working afterwards."""
    out = {}
    try:
        fd.all_gather_with_grad(torch.zeros(2 + rank, 3))
    except ValueError as exc:
        out["batch_mismatch"] = str(exc)
    try:
        fd.gather_tokens(Tokens.dense(torch.zeros(2, 3, 4 + rank)))
    except ValueError as exc:
        out["feature_mismatch"] = str(exc)
    check = torch.ones(1)
    dist.all_reduce(check)
    out["after_errors"] = float(check)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    as_torchrun_rank(rank, port)
    device = fd.setup_from_env("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        results = {
            "device": str(device),
            "rank": fd.rank(),
            "world_size": fd.world_size(),
            "is_distributed": fd.is_distributed(),
        }
        for name, scenario in SCENARIOS.items():
            results[name] = _distributed_step(scenario, rank)
        results["gather"] = _gather_checks(rank)
        results["errors"] = _error_checks(rank)
    finally:
        fd.cleanup()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Results of both ranks of one 2-process gloo run."""
    out_dir = tmp_path_factory.mktemp("distributed")
    spawn(_worker, free_port(), str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _train_worker(rank: int, ports: tuple[int, int], config: str, out_dir: str) -> None:
    """``fastalign train`` as torchrun starts it, this rank's stdout and stderr written to
    files; then, in a new group with a 2 s timeout, rank 0 gathers while rank 1 hangs."""
    as_torchrun_rank(rank, ports[0])
    import fastalign.progress

    fastalign.progress._interactive = lambda: True  # bars are drawn, as on a terminal
    for number, name in ((1, "out"), (2, "err")):
        with open(os.path.join(out_dir, f"rank{rank}.{name}"), "w") as f:
            os.dup2(f.fileno(), number)
    results = {}
    try:
        main(["train", "--config", config])
        results["timeout_s"] = fd._group_timeout.total_seconds()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        fd.cleanup()
    os.environ["MASTER_PORT"] = str(ports[1])
    fd.setup_from_env("gloo", timeout=datetime.timedelta(seconds=2))
    try:
        if rank == 0:
            tokens = Tokens.dense(torch.zeros(2, 3, 4))
            try:
                fd.global_batch_scores(tokens, tokens, region_word_scores)
            except fd.CollectiveTimeoutError as exc:
                results["error"] = str(exc)
        else:
            time.sleep(4)  # hung: rank 0 times out meanwhile
    finally:
        dist.destroy_process_group()  # no barrier: a timeout closes the group's connections
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def training_ranks(tmp_path_factory, tiny_data, tiny_config) -> list[dict]:
    """Per rank: what ``fastalign train`` printed (``out``, ``err``) with 2 gloo processes
    (1 epoch on the tiny data, progress bars on), the timeout of its process group, and the
    error of a gather that timed out."""
    out_dir = tmp_path_factory.mktemp("distributed_training")
    config = tiny_config(tiny_data, out_dir / "run", epochs=1, dist_timeout_minutes=1.5)
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    spawn(_train_worker, (free_port(), free_port()), str(path), str(out_dir))
    return [
        torch.load(out_dir / f"rank{r}.pt")
        | {name: (out_dir / f"rank{r}.{name}").read_text() for name in ("out", "err")}
        for r in range(WORLD)
    ]


def _demo_worker(rank: int, port: int, overrides: list[str], out_dir: str) -> None:
    """``fastalign demo`` as torchrun starts it, this rank's stdout written to a file."""
    as_torchrun_rank(rank, port)
    with open(os.path.join(out_dir, f"rank{rank}.out"), "w") as f:
        os.dup2(f.fileno(), 1)
        try:
            main(["demo", "--no-progress", *overrides])
        finally:
            sys.stdout.flush()
            fd.cleanup()


# --------------------------------------------------------------------------- 2 processes
def test_two_processes_helpers(ranks):
    for r, result in enumerate(ranks):
        assert result["rank"] == r
        assert result["world_size"] == WORLD
        assert result["is_distributed"]
        assert result["device"] == "cpu"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_match_single_process(ranks, name):
    loss, grads = single_process_reference(SCENARIOS[name])
    assert loss > 0
    for result in ranks:  # rank 0 and rank 1 agree (DDP), and both match one process
        step = result[name]
        torch.testing.assert_close(step["loss"], loss, rtol=1e-6, atol=1e-12)
        assert step["grads"].keys() == grads.keys()
        for param, grad in grads.items():
            assert grad.abs().max() > 0, param
            torch.testing.assert_close(step["grads"][param], grad, rtol=1e-6, atol=1e-10)
    # Each returned value is W times the rank's share: their mean is the loss.
    shares = torch.stack([result[name]["share"] for result in ranks])
    torch.testing.assert_close(shares.mean(), loss, rtol=1e-6, atol=1e-12)


def test_two_processes_scores_layout(ranks):
    batch = make_batch()
    with torch.no_grad():
        full = similarity(SCENARIOS["hinge_sum"])(*encode(make_model(), batch))
    per_rank = len(IMAGE_INDEX) // WORLD
    for r, result in enumerate(ranks):
        gather = result["gather"]
        assert gather["offset"] == r * per_rank
        lo, hi = r * per_rank, (r + 1) * per_rank
        torch.testing.assert_close(gather["rows"], full[lo:hi], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gather["cols"], full[:, lo:hi], rtol=1e-12, atol=1e-12)


def test_two_processes_all_gather_with_grad(ranks):
    expected = torch.cat([torch.arange(6.0).reshape(3, 2) + 10 * r for r in range(WORLD)])
    weight_sum = torch.arange(12.0).reshape(6, 2) * sum(r + 1 for r in range(WORLD))
    for r, result in enumerate(ranks):
        gather = result["gather"]
        torch.testing.assert_close(gather["all_gather"], expected)
        # d/dx_r of sum over ranks s of (y * weight_s).sum(): the rank's slice of the sum.
        torch.testing.assert_close(gather["all_gather_grad"], weight_sum[3 * r : 3 * r + 3])


def test_two_processes_gather_tokens(ranks):
    t_max = 3 + WORLD - 1
    for r, result in enumerate(ranks):
        gather = result["gather"]
        assert gather["tokens_type"] == "Tokens"
        tokens = gather["tokens"]
        assert tokens.shape == (2 * WORLD, t_max, 4)
        assert gather["token_lengths"].tolist() == [n for s in range(WORLD) for n in (1, 3 + s)]
        for s in range(WORLD):
            block = tokens[2 * s : 2 * s + 2]
            assert (block[:, : 3 + s] == s + 1).all()
            assert (block[:, 3 + s :] == 0).all()  # zero padding
        # every rank's loss is sum(y ** 2): the gradient 2 * x summed over W ranks
        torch.testing.assert_close(
            gather["tokens_grad"], torch.full((2, 3 + r, 4), 2.0 * WORLD * (r + 1))
        )


def test_two_processes_shape_errors(ranks):
    for result in ranks:
        errors = result["errors"]
        assert "same shape on every rank" in errors["batch_mismatch"]
        assert "rank 0: (2, 3), rank 1: (3, 3)" in errors["batch_mismatch"]
        assert "same batch size B and feature size D" in errors["feature_mismatch"]
        assert errors["after_errors"] == WORLD


def test_two_process_training_prints_on_rank_0_only(training_ranks):
    first, second = training_ranks
    assert "epoch 1/1" in first["err"]  # the progress bar
    assert "epoch 1:" in first["err"] and "val rSum" in first["err"]
    assert "best validation" in first["out"] and "rSum" in first["out"]
    assert second["out"] == "" and second["err"] == ""


def test_two_process_demo_prints_on_rank_0_only(tmp_path, tiny_data):
    overrides = [
        f"data_root={tiny_data}",
        f"word_vectors={tiny_data / 'glove_synthetic.txt'}",
        f"output_dir={tmp_path / 'run'}",
        "epochs=1",
        "batch_size=16",
        "model.word_dim=16",
        "model.embed_dim=32",
    ]
    spawn(_demo_worker, free_port(), overrides, str(tmp_path))
    first, second = ((tmp_path / f"rank{r}.out").read_text() for r in range(WORLD))
    assert "synthetic test set" in first and "for random scores (chance)" in first
    assert second == ""


def test_two_process_training_uses_the_configured_timeout(training_ranks):
    for result in training_ranks:
        assert result["timeout_s"] == 90


def test_two_processes_a_timed_out_gather_names_itself(training_ranks):
    error = training_ranks[0]["error"]
    assert "rank 0 of 2: the all_gather of the shapes of the image embeddings" in error
    assert "timed out after 2 s" in error and "check the other ranks' output" in error
    assert "dist_timeout_minutes" in error


# --------------------------------------------------------------------------- 1 process
def test_collective_errors(monkeypatch):
    monkeypatch.setattr(fd, "_group_timeout", datetime.timedelta(minutes=10))
    gloo = "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 600000ms for recv"
    with pytest.raises(fd.CollectiveTimeoutError, match="rank 0 of 1: the barrier x timed out"):
        with fd.collective("barrier x"):
            raise RuntimeError(gloo)
    with pytest.raises(fd.CollectiveTimeoutError, match="after 10 min") as info:
        with fd.collective("outer"), fd.collective("inner"):  # the innermost name wins
            raise RuntimeError(gloo)
    assert "inner" in str(info.value) and "outer" not in str(info.value)
    with pytest.raises(
        RuntimeError, match="^Connection reset by peer$"
    ):  # other errors pass unchanged
        with fd.collective("barrier x"):
            raise RuntimeError("Connection reset by peer")
    assert fd.timeout_from_minutes(0.5) == datetime.timedelta(seconds=30)
    for bad in (0, -1, float("inf"), "10", True):
        with pytest.raises(ValueError, match="dist_timeout_minutes must be a positive number"):
            fd.timeout_from_minutes(bad)


def test_helpers_without_process_group():
    assert not fd.is_distributed()
    assert fd.rank() == 0
    assert fd.world_size() == 1
    fd.cleanup()  # a no-op without a group


def test_all_gather_with_grad_world_size_one():
    x = torch.randn(3, 4, requires_grad=True)
    y = fd.all_gather_with_grad(x)
    assert y is x
    (2 * y).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), 2.0))


def test_all_gather_with_grad_errors():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fd.all_gather_with_grad([1.0, 2.0])
    with pytest.raises(ValueError, match="at least one dimension"):
        fd.all_gather_with_grad(torch.tensor(1.0))


def test_gather_tokens_world_size_one():
    x = torch.randn(2, 5, 3)
    result = fd.gather_tokens(Tokens.dense(x))
    assert isinstance(result, Tokens)
    out, lengths = result
    assert out is x
    assert lengths.tolist() == [5, 5] and lengths.dtype == torch.int64
    result = fd.gather_tokens(Tokens(x, torch.tensor([2, 5], dtype=torch.int32)))
    assert isinstance(result, Tokens) and result.embs is x
    assert result.lengths.tolist() == [2, 5] and result.lengths.dtype == torch.int64
    with pytest.raises(ValueError, match="tokens.embs must be 3-D"):
        fd.gather_tokens(Tokens(torch.randn(2, 5), torch.tensor([5, 5])))
    with pytest.raises(ValueError, match=r"tokens.lengths must have shape \(2,\)"):
        fd.gather_tokens(Tokens(x, torch.tensor([1, 2, 3])))
    with pytest.raises(TypeError, match="tokens.lengths must hold integers"):
        fd.gather_tokens(Tokens(x, torch.tensor([1.0, 2.0])))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_global_batch_loss_single_process_equals_plain_loss(name):
    scenario = SCENARIOS[name]
    loss, grads = single_process_reference(scenario)
    model, batch = make_model(), make_batch()
    got = fd.global_batch_loss(
        *encode(model, batch), batch["image_index"], similarity(scenario), **loss_options(scenario)
    )
    got.backward()
    torch.testing.assert_close(got.detach(), loss, rtol=1e-12, atol=1e-12)
    for param, grad in model.named_parameters():
        torch.testing.assert_close(grad.grad, grads[param], rtol=1e-10, atol=1e-12)


def test_global_batch_scores_single_process():
    regions, words = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 2, 5).double()
    images, captions = Tokens.dense(regions), Tokens.dense(words)
    rows, cols, offset = fd.global_batch_scores(images, captions, region_word_scores)
    assert rows is cols and offset == 0
    torch.testing.assert_close(rows, fastalign.region_word_similarity(regions, words))
    with pytest.raises(ValueError, match="same number of pairs"):
        fd.global_batch_scores(images, captions.rows(0, 2), region_word_scores)


def test_global_batch_loss_without_image_index():
    scores_fn = functools.partial(region_word_scores, direction="both")
    g = torch.Generator().manual_seed(3)
    regions = Tokens.dense(torch.randn(4, 3, 6, generator=g, dtype=torch.float64))
    words = Tokens.dense(torch.randn(4, 5, 6, generator=g, dtype=torch.float64))
    scores = fastalign.region_word_similarity(regions.embs, words.embs, direction="both")
    for loss, plain in (("hinge", hinge_triplet_loss(scores)), ("infonce", info_nce_loss(scores))):
        got = fd.global_batch_loss(regions, words, None, scores_fn, loss=loss)
        torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)


def test_global_batch_losses_gives_each_pairs_own_loss():
    """The per-pair losses come from the same scores: row k's plus column k's hinge term (the
    hinge loss is their sum), or the mean of the two cross-entropies (InfoNCE: their mean)."""
    scores_fn = functools.partial(region_word_scores, direction="both")
    g = torch.Generator().manual_seed(5)
    regions = Tokens.dense(torch.randn(7, 3, 6, generator=g, dtype=torch.float64))
    words = Tokens.dense(torch.randn(7, 5, 6, generator=g, dtype=torch.float64))
    image_index = torch.tensor([0, 1, 1, 2, 3, 4, 5])  # pairs 1 and 2 share an image
    scores = fastalign.region_word_similarity(regions.embs, words.embs, direction="both")
    positives = image_index[:, None] == image_index[None, :]
    for loss, reduce in (("hinge", torch.sum), ("infonce", torch.mean)):
        total, pairs = fd.global_batch_losses(regions, words, image_index, scores_fn, loss=loss)
        assert not pairs.requires_grad and pairs.shape == (7,)
        torch.testing.assert_close(reduce(pairs), total, rtol=1e-12, atol=1e-12)
        assert torch.equal(
            total, fd.global_batch_loss(regions, words, image_index, scores_fn, loss=loss)
        )
    cost = (0.2 + scores - scores.diagonal()[:, None]).clamp(min=0).masked_fill(positives, 0)
    cost_t = (0.2 + scores - scores.diagonal()[None, :]).clamp(min=0).masked_fill(positives, 0)
    _, pairs = fd.global_batch_losses(regions, words, image_index, scores_fn)
    torch.testing.assert_close(pairs, cost.amax(1) + cost_t.amax(0), rtol=1e-12, atol=1e-12)


def test_global_batch_loss_argument_errors():
    regions, words = Tokens.dense(torch.randn(2, 3, 4)), Tokens.dense(torch.randn(2, 3, 4))
    fn = region_word_scores
    with pytest.raises(ValueError, match="loss must be one of"):
        fd.global_batch_loss(regions, words, None, fn, loss="triplet")
    with pytest.raises(ValueError, match="temperature must be positive"):
        fd.global_batch_loss(regions, words, None, fn, loss="infonce", temperature=0)
    with pytest.raises(ValueError, match="image_index must have shape"):
        fd.global_batch_loss(regions, words, torch.tensor([0, 1, 2]), fn)


def test_setup_from_env_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert fd.setup_from_env("gloo") == torch.device("cpu")
    assert not fd.is_distributed()


def test_setup_from_env_incomplete_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT is not"):
        fd.setup_from_env("gloo")
    assert not fd.is_distributed()


def test_world_size_one_process_group(monkeypatch):
    """A real (gloo) group of one process: the local matrices and the plain loss."""
    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
    ).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    fd.setup_from_env("gloo", timeout=datetime.timedelta(seconds=30))
    try:
        assert fd.is_distributed() and fd.rank() == 0 and fd.world_size() == 1
        x = torch.randn(2, 3)
        assert fd.all_gather_with_grad(x) is x
        scenario = SCENARIOS["hinge_max"]
        loss, _ = single_process_reference(scenario)
        model, batch = make_model(), make_batch()
        got = fd.global_batch_loss(
            *encode(model, batch),
            batch["image_index"],
            similarity(scenario),
            **loss_options(scenario),
        )
        torch.testing.assert_close(got.detach(), loss, rtol=1e-12, atol=1e-12)
    finally:
        fd.cleanup()
    assert not fd.is_distributed()
