"""One finite-value policy for every operator: a NaN or an infinity in an input raises a
ValueError naming the tensor and the index of the first bad element.

The reference and Triton paths check above dispatch (fastalign/ops/_checks.py: check_finite);
the C++ CPU kernels check what they read themselves (inside their own passes where they can),
with the same message, so every backend raises the same error. CUDA inputs are checked only when
asked for (one device sync per call otherwise); that decision is tested through
finite_check_applies, as no GPU is here.
"""

import math
import os
import subprocess
import sys
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

import fastalign  # noqa: E402
from fastalign.ops import _checks  # noqa: E402
from fastalign.ops._checks import (  # noqa: E402
    check_finite,
    finite_check_applies,
    finite_checks_enabled,
    set_finite_checks,
)

BACKENDS = ["reference", "cpu", "triton"]
VALUES = [math.nan, math.inf, -math.inf]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def region_word_inputs(g):
    regions, words = torch.randn(3, 5, 4, generator=g), torch.randn(4, 6, 4, generator=g)
    return dict(
        regions=regions,
        words=words,
        region_lengths=torch.tensor([5, 2, 3]),
        word_lengths=torch.tensor([1, 6, 4, 2]),
        direction="both",
    )


def paired_inputs(names):
    def make(g):
        return {name: torch.randn(6, 5, generator=g) for name in names}

    return make


def sparse_soft_inputs(g):
    return dict(**paired_inputs(("img", "txt"))(g), select="soft", alpha=torch.rand(6, generator=g))


def update_inputs(g):
    return dict(
        prototypes=torch.randn(4, 5, generator=g),
        x=torch.randn(6, 5, generator=g),
        assignments=torch.rand(6, 4, generator=g),
    )


def topk_inputs(g):
    return dict(
        queries=torch.randn(6, 5, generator=g),
        keys=torch.randn(7, 5, generator=g),
        values=torch.randn(7, 3, generator=g),
        m=3,
    )


# operator, input maker, the tensors the policy checks, whether it takes a backend
OPERATORS = {
    "region_word_similarity": (region_word_inputs, ("regions", "words"), True),
    "dimension_correlation": (paired_inputs(("a", "b")), ("a", "b"), False),
    "dimension_correlation_loss": (paired_inputs(("a", "b")), ("a", "b"), True),
    "sparse_select": (
        lambda g: dict(E=torch.rand(6, 6, generator=g), alpha=torch.rand(6, generator=g)),
        ("E", "alpha"),
        False,
    ),
    "sparse_spatial_loss": (sparse_soft_inputs, ("img", "txt", "alpha"), True),
    "prototype_assign": (
        lambda g: dict(x=torch.randn(6, 5, generator=g), prototypes=torch.randn(4, 5, generator=g)),
        ("x", "prototypes"),
        True,
    ),
    "prototype_update": (update_inputs, ("prototypes", "x", "assignments"), True),
    "prototype_topk_mix": (topk_inputs, ("queries", "keys", "values"), True),
}
CASES = [
    (op, name, backend)
    for op, (_, names, has_backend) in OPERATORS.items()
    for name in names
    for backend in (BACKENDS if has_backend else [None])
]


def valid_index(kwargs, name, g) -> tuple[int, ...]:
    """A random index of ``name`` that the kernels read (a valid token for region-word), never
    the first element: the reported index must be the bad one, not the start of the tensor."""
    x = kwargs[name]
    lengths = {"regions": "region_lengths", "words": "word_lengths"}.get(name)
    while True:
        index = tuple(int(torch.randint(0, size, (), generator=g)) for size in x.shape)
        if lengths and index[1] >= int(kwargs[lengths][index[0]]):
            continue
        if any(index):
            return index


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("value", VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op,name,backend", CASES)
def test_non_finite_input_raises_naming_tensor_and_index(op, name, backend, value):
    if backend is not None and fastalign.backends()[backend] != "available":
        pytest.skip(f"{backend} not available")
    seed = seed_of(op, name, backend, value)
    g = torch.Generator().manual_seed(seed)
    make, _, _ = OPERATORS[op]
    kwargs = make(g)
    if backend is not None:
        kwargs["backend"] = backend
    index = valid_index(kwargs, name, g)
    kwargs[name][index] = value
    expected = f"{name} holds a non-finite value ({value}) at [{', '.join(map(str, index))}]"
    try:
        getattr(fastalign, op)(**kwargs)
    except ValueError as exc:
        assert expected in str(exc), f"seed {seed}: got {exc!s}, expected {expected!r}"
    else:
        pytest.fail(f"seed {seed}: {op} on {backend} did not raise for {expected!r}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_region_word_ignores_non_finite_padding(backend):
    """Padded tokens are never read: NaN and inf there neither raise nor reach the scores or the
    gradients, on every backend (the reference zeroes them before its einsum)."""
    if fastalign.backends()[backend] != "available":
        pytest.skip(f"{backend} not available")
    seed = 1411
    torch.manual_seed(seed)
    kwargs = region_word_inputs(torch.Generator().manual_seed(seed))
    padded_regions = torch.arange(5) >= kwargs["region_lengths"][:, None]
    padded_words = torch.arange(6) >= kwargs["word_lengths"][:, None]
    results = []
    for fill in (0.0, math.nan, math.inf):
        regions = kwargs["regions"].masked_fill(padded_regions[..., None], fill).requires_grad_()
        words = kwargs["words"].masked_fill(padded_words[..., None], fill).requires_grad_()
        call = dict(kwargs, regions=regions, words=words, backend=backend)
        scores = fastalign.region_word_similarity(**call)
        scores.sum().backward()
        results.append((scores, regions.grad, words.grad))
    for scores, grad_regions, grad_words in results[1:]:
        torch.testing.assert_close(scores, results[0][0], msg=lambda m: f"seed {seed}: {m}")
        torch.testing.assert_close(grad_regions, results[0][1], msg=lambda m: f"seed {seed}: {m}")
        torch.testing.assert_close(grad_words, results[0][2], msg=lambda m: f"seed {seed}: {m}")
        assert (grad_regions[padded_regions] == 0).all() and (grad_words[padded_words] == 0).all()


def test_large_finite_values_pass():
    """The check sums first; a sum that overflows must not be taken for an infinity."""
    x = torch.full((4, 3), 3e38)
    assert torch.isinf(x.sum())
    check_finite("x", x)


@pytest.fixture
def finite_switch():
    """Restores the CUDA switch after a test that flips it."""
    before = finite_checks_enabled()
    yield
    set_finite_checks(before)


def test_cpu_is_always_checked_other_devices_only_when_switched_on(finite_switch):
    set_finite_checks(False)
    assert finite_check_applies(torch.device("cpu"))
    assert not finite_check_applies(torch.device("cuda", 0))
    set_finite_checks(True)
    assert finite_check_applies(torch.device("cpu"))
    assert finite_check_applies(torch.device("cuda", 0))


def test_switched_off_device_tensors_are_never_read(finite_switch):
    """With the switch off a non-CPU tensor is not looked at (on CUDA: no synchronisation). A
    meta tensor stands in for it: reading its values would raise."""
    x = torch.empty(4, 3, device="meta")
    set_finite_checks(False)
    check_finite("x", x)
    set_finite_checks(True)
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_finite("x", x)


def test_switch_takes_only_a_bool(finite_switch):
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_finite_checks(1)


def test_public_switch_is_the_one_the_operators_read(finite_switch):
    fastalign.set_finite_checks(True)
    assert _checks.finite_checks_enabled()
    fastalign.set_finite_checks(False)
    assert not _checks.finite_checks_enabled()


@pytest.mark.parametrize("env,expected", [("1", True), ("0", False)])
def test_environment_variable_sets_the_switch_at_import(env, expected):
    environ = {k: v for k, v in os.environ.items() if k != "FASTALIGN_CHECK_FINITE"}
    if env is not None:
        environ["FASTALIGN_CHECK_FINITE"] = env
    code = "from fastalign.ops._checks import finite_checks_enabled as f; print(f())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(expected)
