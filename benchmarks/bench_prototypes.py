"""Prototype operators: plain PyTorch versus fastalign.

prototype_assign (softmax, cosine scores, tau 0.1): plain = F.normalize both, matmul, softmax,
autograd; N = 4096, K in {256, 4096, 12385}, D in {300, 1024}; forward, and forward + backward
(gradients w.r.t. x and the prototypes). prototype_topk_mix (MASK's out-of-vocabulary mixture,
m = 10, tau 1): plain = normalised matmul (N x K), torch.topk, gather, softmax, weighted sum;
N in {2000, 20000}, K = 12385 (the MASK vocabulary), D = Dv = 300; forward, and forward +
backward (w.r.t. queries, keys and values). For assign, ``gemm_floor`` times only the matrix
products that any exact implementation performs (the N x K scores; with the backward also dL/dS
times the prototypes and its transpose times x): its speedup is the most any implementation can
reach on this BLAS. float32. Time: the median of plain and
fastalign calls that alternate (a change in a shared machine's load affects both alike);
memory is the peak rise during one call (see benchmarks/_runner.py).

    python benchmarks/bench_prototypes.py [--quick] [--device cpu|cuda]
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

ASSIGN_ROWS = 4096
ASSIGN_PROTOTYPES = (256, 4096, 12385)
ASSIGN_DIMS = (300, 1024)
TOPK_QUERIES = (2000, 20000)
TOPK_KEYS = 12385
TOPK_DIM = 300
TOPK_M = 10
TAU = 0.1
QUICK = dict(assign_prototypes=(256, 4096), assign_dims=(300,), topk_queries=(2000,))


def plain_assign(x, prototypes):
    """The usual way: cosine scores, temperature, softmax (SwAV / PICO-style codes)."""
    scores = F.normalize(x, dim=1) @ F.normalize(prototypes, dim=1).T
    return torch.softmax(scores / TAU, dim=1)


def plain_topk_mix(queries, keys, values):
    """MASK eqs. 11-13 the direct way: the full N x K cosine matrix, then topk and gather."""
    with torch.no_grad():
        cosine = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
        indices = cosine.topk(TOPK_M, dim=1).indices
        del cosine
    logits = (queries[:, None, :] * keys[indices]).sum(dim=-1)
    weights = torch.softmax(logits, dim=1)
    return (weights[..., None] * values[indices]).sum(dim=1)


def fastalign_assign(x, prototypes):
    return fastalign.prototype_assign(x, prototypes, tau=TAU)


def fastalign_topk_mix(queries, keys, values):
    return fastalign.prototype_topk_mix(queries, keys, values, m=TOPK_M)


def make_inputs(op: str, n: int, k: int, d: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, d), (k, d)] + ([(k, TOPK_DIM)] if op == "topk" else [])
    return [torch.randn(*s, generator=g).to(device) for s in shapes]


def gemm_floor_case(x, prototypes, mode):
    """The three (forward: one) N x K x D products of the softmax assignment, on normalised
    inputs and a fixed dL/dS."""
    x, prototypes = F.normalize(x, dim=1), F.normalize(prototypes, dim=1)
    grad_scores = torch.randn(x.shape[0], prototypes.shape[0], device=x.device)

    def products():
        scores = x @ prototypes.T
        if mode == "forward":
            return scores
        return scores, grad_scores @ prototypes, grad_scores.T @ x

    return products


def build_case(key: str):
    """``key`` = op:n:k:d:impl:mode:device; returns a zero-argument callable."""
    op, n, k, d, impl, mode, device = key.split(":")
    inputs = make_inputs(op, int(n), int(k), int(d), device)
    if impl == "gemm_floor":
        return gemm_floor_case(*inputs, mode)
    fn = {
        ("assign", "plain"): plain_assign,
        ("assign", "fastalign"): fastalign_assign,
        ("topk", "plain"): plain_topk_mix,
        ("topk", "fastalign"): fastalign_topk_mix,
    }[op, impl]
    upstream = None
    if mode != "forward":
        out_shape = fn(*inputs).shape
        upstream = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device)
    return operator_case(fn, inputs, mode, upstream)


IMPLS = ("plain", "fastalign")
MODES = ("forward", "forward+backward")


def suite(device: str) -> list[str]:
    """The case keys of the pytest-benchmark suite (benchmarks/test_kernels.py): assign at
    N = K = 4096, D = 300, and the top-m mixture of 2000 queries over the MASK vocabulary."""
    shapes = (f"assign:{ASSIGN_ROWS}:4096:300", f"topk:2000:{TOPK_KEYS}:{TOPK_DIM}")
    return [f"{shape}:fastalign:{mode}:{device}" for shape in shapes for mode in MODES]


def warmup_key(key: str) -> str:
    """A small case of the same kind, so one-time allocations are not counted."""
    op, _, _, _, rest = key.split(":", 4)
    return f"{op}:64:96:32:{rest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smaller shapes only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5, help="calls of each implementation")
    parser.add_argument("--only", choices=("assign", "topk"), help="one operator only")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = []
    if args.only != "topk":
        prototypes = QUICK["assign_prototypes"] if args.quick else ASSIGN_PROTOTYPES
        dims = QUICK["assign_dims"] if args.quick else ASSIGN_DIMS
        shapes += [("assign", ASSIGN_ROWS, k, d) for d in dims for k in prototypes]
    if args.only != "assign":
        queries = QUICK["topk_queries"] if args.quick else TOPK_QUERIES
        shapes += [("topk", n, TOPK_KEYS, TOPK_DIM) for n in queries]
    rows, gaps = [], []
    for op, n, k, d in shapes:
        inputs = make_inputs(op, n, k, d, device.type)
        plain_fn, fast_fn = (
            (plain_assign, fastalign_assign)
            if op == "assign"
            else (plain_topk_mix, fastalign_topk_mix)
        )
        with torch.no_grad():
            want = plain_fn(*inputs)
            gaps.append(float((fast_fn(*inputs) - want).abs().max() / want.abs().max()))
        del inputs, want
        for mode in MODES:
            impls = IMPLS + (("gemm_floor",) if op == "assign" else ())
            keys = {impl: f"{op}:{n}:{k}:{d}:{impl}:{mode}:{device.type}" for impl in impls}
            labels = {"op": op, "N": n, "K": k, "D": d, "mode": mode}
            rows += compare_cases(labels, keys, build_case, device, args.repeat)
    print(f"largest relative gap fastalign vs plain (forward): {max(gaps):.1e}")
    report(
        rows,
        "prototypes" + ("_quick" if args.quick else ""),
        f"prototype_assign (softmax) and prototype_topk_mix, float32, on "
        f"{machine_description(device)}",
    )


if __name__ == "__main__":
    if not serve_memory_request(build_case, warmup_key):
        main()
