"""dimension_correlation_loss: plain PyTorch (Barlow Twins' code) versus fastalign.

Plain: what Barlow Twins does (batch_norm without affine to standardise the columns, C = A^T B
/ N, (diag - 1)^2 and the off-diagonal squares, autograd); fastalign: one fused call, the
gradient computed in the forward. Forward, and forward + backward (gradients w.r.t. both
inputs), for N in {128, 256, 4096} x D in {512, 1024, 2048}, float32, barlow with lambda 0.005
(``--loss softmax`` for the softmax form). Time is the median of a few calls; memory is the
peak rise during one call (see benchmarks/_runner.py).

    python benchmarks/bench_dimension_correlation.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import (  # noqa: E402
    compare_cases,
    machine_description,
    operator_case,
    report,
    serve_memory_request,
)

import fastalign  # noqa: E402

ROWS = (128, 256, 4096)
DIMS = (512, 1024, 2048)
QUICK_ROWS = (128, 256)
QUICK_DIMS = (512, 1024)
LAMBDA = 0.005
TAU = 0.1
EPS = 1e-5


def off_diagonal(x):
    """Barlow Twins' helper: the off-diagonal elements of a square matrix, flattened."""
    n, m = x.shape
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def plain_loss(a, b, loss):
    """Barlow Twins' loss (facebookresearch/barlowtwins, main.py) on paired features."""
    n = a.shape[0]
    c = F.batch_norm(a, None, None, training=True, eps=EPS).T @ F.batch_norm(
        b, None, None, training=True, eps=EPS
    )
    c = c / n
    if loss == "softmax":
        rows = torch.log_softmax(c / TAU, dim=1).diagonal()
        cols = torch.log_softmax(c / TAU, dim=0).diagonal()
        return -0.5 * (rows + cols).mean()
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + LAMBDA * off_diag


def fastalign_loss(a, b, loss):
    return fastalign.dimension_correlation_loss(
        a, b, mode=loss, off_diagonal_weight=LAMBDA, tau=TAU, eps=EPS
    )


def make_inputs(n, d, device, seed=0):
    """Paired features with a shared component, as two encoders of one pair would give."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=g)
    a = shared + 0.5 * torch.randn(n, d, generator=g)
    b = shared + 0.5 * torch.randn(n, d, generator=g)
    return a.to(device), b.to(device)


def build_case(key: str):
    """``key`` = n:d:impl:mode:loss:device; returns a zero-argument callable."""
    n, d, impl, mode, loss, device = key.split(":")
    a, b = make_inputs(int(n), int(d), device)
    fn = plain_loss if impl == "plain" else fastalign_loss
    return operator_case(lambda a, b: fn(a, b, loss), (a, b), mode)


def warmup_key(key: str) -> str:
    """A small case of the same kind, so one-time allocations are not counted."""
    _, _, rest = key.split(":", 2)
    return f"64:96:{rest}"


def suite(device: str) -> list[str]:
    """The case keys of the pytest-benchmark suite (benchmarks/test_kernels.py): D = 1024 through
    the Gram matrices (N = 256) and through C (N = 4096), barlow; softmax at N = 256."""
    cases = [(n, mode, "barlow") for n in (256, 4096) for mode in ("forward", "forward+backward")]
    cases.append((256, "forward+backward", "softmax"))
    return [f"{n}:1024:fastalign:{mode}:{loss}:{device}" for n, mode, loss in cases]


def path_of(n: int, d: int, loss: str) -> str:
    """The fast backends' route: the Gram matrices for barlow with N < D, else through C."""
    return "Gram" if loss == "barlow" and n < d else "C"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {128, 256}, D in {512, 1024}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loss", default="barlow", choices=("barlow", "softmax"))
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    gaps = []
    for n in QUICK_ROWS if args.quick else ROWS:
        for d in QUICK_DIMS if args.quick else DIMS:
            a, b = make_inputs(n, d, device)
            with torch.no_grad():
                gap = (fastalign_loss(a, b, args.loss) - plain_loss(a, b, args.loss)).abs()
                gaps.append(float(gap / plain_loss(a, b, args.loss).abs()))
            # the largest cases take a second a call: fewer repeats
            repeat = args.repeat if n * d * d < 4096 * 1024 * 1024 else 3
            for mode in ("forward", "forward+backward"):
                keys = {
                    impl: f"{n}:{d}:{impl}:{mode}:{args.loss}:{device.type}"
                    for impl in ("plain", "fastalign")
                }
                labels = {"N": n, "D": d, "mode": mode, "path": path_of(n, d, args.loss)}
                rows += compare_cases(labels, keys, build_case, device, repeat)
    print(f"largest relative loss gap fastalign vs plain: {max(gaps):.1e}")
    report(
        rows,
        f"dimension_correlation_{args.loss}",
        f"dimension_correlation_loss ({args.loss}, float32) on {machine_description(device)}",
    )


if __name__ == "__main__":
    if not serve_memory_request(build_case, warmup_key):
        main()
