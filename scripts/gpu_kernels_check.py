"""GPU check of vtr.kernels: Triton kernels vs torch fallbacks on CUDA, then the kernel benchmark.

Usage (on a CUDA machine, from the repo root; about 1-3 minutes on one modern GPU):

    OUT=/some/dir python scripts/gpu_kernels_check.py [--skip-bench]

Writes ``agreement.json`` and ``kernels.json`` (+ ``bench.md``) under ``$OUT`` (default
``bench_out/gpu_kernels``). Exits 1 if any Triton result disagrees with its fallback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

import vtr.kernels as K
from vtr.bench import kernels as bench
from vtr.kernels.dispatch import load_triton, resolve_backend

# Fallback matmuls must be full fp32 too, or they (not the kernels) would flip picks.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rand(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)


def check_cosine(results: list[dict]) -> None:
    for dtype in DTYPES:
        for shape_a, shape_b in (((1, 7), (3, 7)), ((577, 4096), (300, 4096)), ((2, 129, 1000), (2, 65, 1000))):
            a, b = _rand(*shape_a, seed=1, dtype=dtype), _rand(*shape_b, seed=2, dtype=dtype)
            err = (K.cosine_similarity(a, b, backend="triton") - K.cosine_similarity(a, b, backend="torch")).abs()
            ok = float(err.max()) <= 1e-5
            results.append({"kernel": "cosine_similarity", "dtype": str(dtype), "a": shape_a, "b": shape_b,
                            "max_abs_err": float(err.max()), "ok": ok})  # fmt: skip


def check_best_match(results: list[dict]) -> None:
    for dtype in DTYPES:
        for bsz, na, nb, d in ((1, 1, 1, 8), (4, 289, 288, 1024), (2, 1000, 999, 64)):
            a, b = _rand(bsz, na, d, seed=3, dtype=dtype), _rand(bsz, nb, d, seed=4, dtype=dtype)
            b[:, -1] = b[:, 0]  # exact duplicate column: ties must go to the lowest index
            a_mask = torch.ones(bsz, na, dtype=torch.bool, device="cuda")
            a_mask[:, 0] = False
            b_mask = torch.ones(bsz, nb, dtype=torch.bool, device="cuda")
            b_mask[:, min(1, nb - 1)] = False
            for masks in ({}, {"a_mask": a_mask, "b_mask": b_mask}):
                v1, i1 = K.bipartite_best_match(a, b, backend="triton", **masks)
                v2, i2 = K.bipartite_best_match(a, b, backend="torch", **masks)
                finite = torch.isfinite(v2)
                err = float((v1[finite] - v2[finite]).abs().max()) if finite.any() else 0.0
                mism = int((i1 != i2).sum())
                # Values are in the input dtype (ToMe semantics): cuBLAS may round a half-precision sum to the
                # neighbouring value, so allow one unit in the last place there.
                tol = 1e-5 if dtype == torch.float32 else float(torch.finfo(dtype).eps)
                results.append({"kernel": "bipartite_best_match", "dtype": str(dtype), "shape": (bsz, na, nb, d),
                                "masks": bool(masks), "index_mismatches": mism, "max_abs_err": err,
                                "ok": mism == 0 and err <= tol})  # fmt: skip


def check_maxmin(results: list[dict]) -> None:
    tri = load_triton()
    cases = [(577, 4096, (1, 56, 576)), (2880, 4096, (288,)), (11520, 1024, (1152,)), (16384, 256, (1638,))]
    for dtype in DTYPES:
        for m, d, ks in cases:
            x = _rand(m, d, seed=m + d, dtype=dtype)
            x[m // 2] = x[0]  # duplicates must never be picked twice
            for k in ks:
                got = K.maxmin_select(x, k, backend="triton")
                want = K.maxmin_select(x, k, backend="torch")
                results.append({"kernel": "maxmin_select", "dtype": str(dtype), "m": m, "d": d, "k": k,
                                "path": "stored-dist", "equal": bool(torch.equal(got, want)),
                                "ok": bool(torch.equal(got, want)) and len(set(got.tolist())) == k})  # fmt: skip
    # The row-recomputing path (used when the M x M matrix would exceed MAX_DIST_BYTES).
    saved = tri.MAX_DIST_BYTES
    tri.MAX_DIST_BYTES = 0
    try:
        x = _rand(4099, 1024, seed=5, dtype=torch.float16)
        got, want = K.maxmin_select(x, 400, backend="triton"), K.maxmin_select(x, 400, backend="torch")
        results.append({"kernel": "maxmin_select", "dtype": "torch.float16", "m": 4099, "d": 1024, "k": 400,
                        "path": "recomputed-rows", "equal": bool(torch.equal(got, want)),
                        "ok": bool(torch.equal(got, want))})  # fmt: skip
    finally:
        tri.MAX_DIST_BYTES = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or "bench_out/gpu_kernels")
    out.mkdir(parents=True, exist_ok=True)
    probe = torch.zeros(1, device="cuda")
    assert resolve_backend("auto", probe) == "triton", "auto must pick Triton on CUDA tensors"
    results: list[dict] = []
    t0 = time.perf_counter()
    for check in (check_cosine, check_best_match, check_maxmin):
        check(results)
        print(f"{check.__name__}: done at {time.perf_counter() - t0:.0f}s", flush=True)
    bad = [r for r in results if not r["ok"]]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": len(results),
              "failed": len(bad), "results": results, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (out / "agreement.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"agreement: {len(results) - len(bad)}/{len(results)} checks ok")
    for r in bad:
        print("MISMATCH", r)
    if not args.skip_bench:
        bench_args = argparse.ArgumentParser()
        bench.add_arguments(bench_args)
        ns = bench_args.parse_args(["--out", str(out), "--repeats", "5", "--no-progress"])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            bench.run(ns)
        print(buf.getvalue())
        (out / "bench.md").write_text(buf.getvalue())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
