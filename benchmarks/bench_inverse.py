"""The inverse Hessian factor: `inverse_hessian(H, 0.01)` by the reference's arithmetic
against the direct one, and the direct one's parts.

Rows (per size n; `H` from `random_layer`, damped by 1% of its mean diagonal):
  * `inverse_hessian` backend `reference`: cholesky -> cholesky_inverse -> upper cholesky
    (~4/3 n^3 flops);
  * `inverse_hessian` backend `direct`: `U = (J chol(J H J) J)^-1` (~2/3 n^3 flops), with
    `speedup_vs_reference` and `rel_err` / `rel_err_reference`: `||U^T U - H_d^-1|| / ||H_d^-1||`
    against the float64 inverse (`--check`);
  * parts of the direct path: `cholesky` (of the flipped damped H), `triangular_inverse`
    (`fastprune.hessian.upper_triangular_inverse`, by halves) and `solve_identity`
    (`solve_triangular(R, I)`, the one-call alternative, ~n^3 flops).
`gflops` counts the nominal flops above over the median time.

    python -m benchmarks.bench_inverse                      # n = 1024, 2048, 4096
    python -m benchmarks.bench_inverse --quick --check      # small smoke run
    python -m benchmarks.bench_inverse --out benchmarks/results/inverse_cpu
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import bench, layer, ratio, row, sig, write_rows
from fastprune.hessian import inverse_hessian, upper_triangular_inverse

FULL_SIZES = (1024, 2048, 4096)
QUICK_SIZES = (256, 512)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="comma list of n (default 1024,2048,4096)")
    p.add_argument("--quick", action="store_true", help="n = 256, 512: a smoke run")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--check", action="store_true", help="errors against a float64 inverse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    return p


def _rel_err(U: torch.Tensor, truth: torch.Tensor) -> float:
    U = U.double()
    return sig(((U.t() @ U - truth).norm() / truth.norm()).item(), 3)


def inverse_rows(H: torch.Tensor, device, check: bool) -> list[dict]:
    """The rows for one `H` (see the module docstring)."""
    n = H.shape[0]
    gf = lambda flops, t: sig(flops / t.p50_ms / 1e6)  # noqa: E731
    ref = bench(lambda: inverse_hessian(H, 0.01, method="reference"), device)
    new = bench(lambda: inverse_hessian(H, 0.01), device)
    errs: dict = {}
    if check:
        a = inverse_hessian(H, 0.01)
        b = inverse_hessian(H, 0.01, method="reference")
        Hd = H.double()
        Hd = Hd + a.damp * torch.eye(n, dtype=Hd.dtype, device=Hd.device)
        truth = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
        errs = {"rel_err": _rel_err(a.hinv, truth), "rel_err_reference": _rel_err(b.hinv, truth)}
    out = [
        row(
            "inverse_hessian",
            "reference",
            H.shape,
            H.dtype,
            device,
            ref,
            gflops=gf(4 * n**3 / 3, ref),
        ),
        row(
            "inverse_hessian",
            "direct",
            H.shape,
            H.dtype,
            device,
            new,
            gflops=gf(2 * n**3 / 3, new),
            speedup_vs_reference=ratio(ref, new),
            **errs,
        ),
    ]
    A = torch.flip(H, (0, 1)) + 0.01 * H.diagonal().mean() * torch.eye(
        n, dtype=H.dtype, device=H.device
    )
    chol = bench(lambda: torch.linalg.cholesky(A), device)
    R = torch.flip(torch.linalg.cholesky(A), (0, 1))
    tri = bench(lambda: upper_triangular_inverse(R), device)
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    solve = bench(lambda: torch.linalg.solve_triangular(R, eye, upper=True), device)
    out += [
        row("cholesky", "torch", H.shape, H.dtype, device, chol, gflops=gf(n**3 / 3, chol)),
        row("triangular_inverse", "torch", H.shape, H.dtype, device, tri, gflops=gf(n**3 / 3, tri)),
        row(
            "solve_identity",
            "torch",
            H.shape,
            H.dtype,
            device,
            solve,
            gflops=gf(n**3, solve),
            x_triangular_inverse=ratio(solve, tri),
        ),
    ]
    return out


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = QUICK_SIZES if args.quick else FULL_SIZES
    dtype = getattr(torch, args.dtype)
    out: list[dict] = []
    for n in sizes:
        _, H = layer(8, n, args.device, args.seed)
        out += inverse_rows(H.to(dtype), args.device, args.check)
    write_rows(out, args.out)


if __name__ == "__main__":
    main()
