"""sparse_spatial_loss: plain PyTorch versus fastalign.

Plain: the obvious composition (F.normalize, X = 1 - cos, E = |X - X^T| or |Y - Z|, the
off-diagonal entries, their row mean and biased std, the selection, (1/N) sum w E^2, autograd);
fastalign: one fused call, the gradients computed in the forward. Forward, and forward +
backward (gradients w.r.t. img and txt), for N in {128, 256, 1024, 4096}, D = 1024, float32,
kinds inter and intra, the threshold rule (DIAS's) with alpha = 1 by default (``--select soft``
or ``--select topk`` for the others). Time is the median of a few calls; memory is the peak rise
during one call (see benchmarks/_runner.py).

    python benchmarks/bench_sparse_spatial.py [--quick] [--device cpu|cuda] [--select ...]
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

ROWS = (128, 256, 1024, 4096)
QUICK_ROWS = (128, 256)
DIM = 1024
ALPHA = 1.0
TEMPERATURE = 0.05
TOPK = 10


def plain_loss(img, txt, kind, select):
    """The obvious PyTorch composition of the loss (README, sparse_spatial_loss)."""
    n = img.shape[0]
    u = F.normalize(img, dim=1)
    v = F.normalize(txt, dim=1)
    if kind == "inter":
        x = 1 - u @ v.T
        e = (x - x.T).abs()
    else:
        e = ((1 - u @ u.T) - (1 - v @ v.T)).abs()
    off = ~torch.eye(n, dtype=torch.bool, device=e.device)
    e = e[off].view(n, n - 1)
    if select == "topk":
        w = torch.zeros_like(e).scatter_(1, e.topk(TOPK, dim=1).indices, 1.0)
    else:
        sigma, mu = torch.std_mean(e, dim=1, correction=0, keepdim=True)
        margin = e - (mu + ALPHA * sigma)
        w = (
            (margin > 0).to(e.dtype)
            if select == "threshold"
            else torch.sigmoid(margin / TEMPERATURE)
        )
    return (w * e.square()).sum() / n


def fastalign_loss(img, txt, kind, select):
    return fastalign.sparse_spatial_loss(
        img,
        txt,
        kind=kind,
        select=select,
        alpha=ALPHA,
        k=TOPK if select == "topk" else None,
        temperature=TEMPERATURE,
    )


def make_inputs(n, d, device, seed=0):
    """Paired embeddings with a shared component, as two encoders of one pair would give."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=g)
    img = shared + 0.7 * torch.randn(n, d, generator=g)
    txt = shared + 0.7 * torch.randn(n, d, generator=g)
    return img.to(device), txt.to(device)


def build_case(key: str):
    """``key`` = n:d:impl:mode:kind:select:device; returns a zero-argument callable."""
    n, d, impl, mode, kind, select, device = key.split(":")
    img, txt = make_inputs(int(n), int(d), device)
    fn = plain_loss if impl == "plain" else fastalign_loss
    return operator_case(lambda img, txt: fn(img, txt, kind, select), (img, txt), mode)


def suite(device: str) -> list[str]:
    """The case keys of the pytest-benchmark suite (benchmarks/test_kernels.py): N = 1024,
    both kinds with the threshold rule, and soft and topk (inter) forward + backward."""
    cases = [
        (kind, mode, "threshold")
        for kind in ("inter", "intra")
        for mode in ("forward", "forward+backward")
    ]
    cases += [("inter", "forward+backward", select) for select in ("soft", "topk")]
    return [f"1024:{DIM}:fastalign:{mode}:{kind}:{select}:{device}" for kind, mode, select in cases]


def warmup_key(key: str) -> str:
    """A small case of the same kind, so one-time allocations are not counted."""
    _, _, rest = key.split(":", 2)
    return f"64:96:{rest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {128, 256}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--select", default="threshold", choices=("threshold", "soft", "topk"))
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    gaps = []
    for n in QUICK_ROWS if args.quick else ROWS:
        for kind in ("inter", "intra"):
            img, txt = make_inputs(n, DIM, device)
            with torch.no_grad():
                want = plain_loss(img, txt, kind, args.select)
                gap = (fastalign_loss(img, txt, kind, args.select) - want).abs()
                gaps.append(float(gap / want.abs()))
            repeat = args.repeat if n < 4096 else 3  # about a second a call at N = 4096
            for mode in ("forward", "forward+backward"):
                keys = {
                    impl: f"{n}:{DIM}:{impl}:{mode}:{kind}:{args.select}:{device.type}"
                    for impl in ("plain", "fastalign")
                }
                labels = {"N": n, "kind": kind, "mode": mode}
                rows += compare_cases(labels, keys, build_case, device, repeat)
    print(f"largest relative loss gap fastalign vs plain: {max(gaps):.1e}")
    report(
        rows,
        f"sparse_spatial_{args.select}",
        f"sparse_spatial_loss ({args.select}, D = {DIM}, float32) on {machine_description(device)}",
    )


if __name__ == "__main__":
    if not serve_memory_request(build_case, warmup_key):
        main()
