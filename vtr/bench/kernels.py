"""Max-min selection (DivPrune): Triton kernel vs torch fallback vs the official DivPrune loop.

Each method is split into its similarity phase (normalisation, distances, seed) and its greedy phase
(the ``K`` farthest-point steps). Medians over repeats; fp16 inputs on CUDA, fp32 on CPU.

"official" is the selection loop of the official repository itself (github.com/vbdi/divprune,
``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity`` and ``DivPrune``), compiled at run time
from a checkout outside vtr, whose path is given by ``--official PATH`` or ``$VTR_DIVPRUNE_OFFICIAL``; its code is
never copied into vtr. Without a checkout the row says so. "naive" is vtr's own loop written like it.

    vtr bench kernels [--quick] [--repeats N] [--official PATH] [--out bench_out/kernels]
    python -m vtr.bench.kernels --quick
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FULL_SHAPES",
    "OFFICIAL_ENV",
    "QUICK_SHAPES",
    "add_arguments",
    "load_official",
    "naive_official_select",
    "run",
]

#: (M tokens, K kept, D features): LLaVA-1.5 (576 -> 64 at 4096-d), LLaVA-NeXT-like (2880 -> 288),
#: a long video (11520 -> 1152 at 1024-d).
FULL_SHAPES = ((576, 64, 4096), (2880, 288, 4096), (11520, 1152, 1024))
QUICK_SHAPES = ((256, 32, 128), (1024, 96, 128))
METHODS = ("triton", "torch", "official", "naive")
NA_NO_CUDA = "n/a (no CUDA)"
#: Environment variable naming the official DivPrune checkout (the default of ``--official``).
OFFICIAL_ENV = "VTR_DIVPRUNE_OFFICIAL"
#: Where the official selection loop lives inside a checkout of github.com/vbdi/divprune.
OFFICIAL_FILE = Path("LLaVA/llava/model/llava_arch.py")
NA_NO_OFFICIAL = f"n/a (no official checkout: --official PATH or ${OFFICIAL_ENV})"


@dataclass
class Row:
    """One (shape, method) measurement; phase times are medians in ms, total their sum (``None``: not run)."""

    m: int
    k: int
    d: int
    method: str
    similarity_ms: float | None
    greedy_ms: float | None
    total_ms: float | None
    same_picks_as_fallback: bool | None
    note: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vtr bench kernels``."""
    parser.add_argument("--quick", action="store_true", help=f"small shapes {QUICK_SHAPES} for smoke tests")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per method and shape")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench_out/kernels"), help="folder for the JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--official",
        default=os.environ.get(OFFICIAL_ENV),
        help=f"checkout of github.com/vbdi/divprune (or its {OFFICIAL_FILE}) to time the official loop "
        f"(default: ${OFFICIAL_ENV})",
    )


def load_official(path: str | Path) -> types.SimpleNamespace:
    """The official DivPrune selection, compiled from a checkout of github.com/vbdi/divprune.

    Only the two methods the selection needs are taken from the official file (``pairwise_cosine_similarity``
    and ``DivPrune``); they are compiled with ``torch`` in scope and bound to a stand-in ``self``, because the
    file's module imports the whole official LLaVA package.

    Args:
        path: the checkout's root, or the ``llava_arch.py`` file itself.

    Returns:
        an object with the official ``pairwise_cosine_similarity(matrix)`` and ``DivPrune(x, m, cosine_matrix,
        threshold_ratio) -> (picks, cosine_matrix)`` methods.

    Raises:
        FileNotFoundError / ValueError naming the path when the file or the methods are missing.
    """
    root = Path(path).expanduser()
    src = root / OFFICIAL_FILE if root.is_dir() else root
    if not src.is_file():
        raise FileNotFoundError(
            f"official DivPrune not found: {src} does not exist (expected a checkout of github.com/vbdi/divprune)"
        )
    wanted = ("pairwise_cosine_similarity", "DivPrune")
    tree = ast.parse(src.read_text(), filename=str(src))
    found = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in wanted}
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(f"{src}: no {', '.join(missing)} method: not the official DivPrune llava_arch.py")
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile(ast.Module(body=[found[n] for n in wanted], type_ignores=[]), str(src), "exec"), namespace)
    official = types.SimpleNamespace(source=str(src))
    for name in wanted:
        setattr(official, name, types.MethodType(namespace[name], official))
    return official


def naive_official_select(x: Tensor, k: int) -> Tensor:
    """Official-style DivPrune: full ``M x M`` distance matrix in the input dtype, then per step the min
    distance to the WHOLE selected set is recomputed (O(K^2 M)) and selected tokens are not masked.

    Args:
        x: ``[M, D]``; k: ``1 <= k < M``.

    Returns:
        ``[k]`` int64 in pick order.
    """
    dist = _naive_similarity(x)
    return _naive_greedy(dist, k)


def _naive_similarity(x: Tensor) -> Tensor:
    u = x / x.norm(dim=1, keepdim=True)
    return 1.0 - u @ u.T


def _naive_greedy(dist: Tensor, k: int) -> Tensor:
    picks = torch.empty(k, dtype=torch.long, device=dist.device)
    for i in range(k):
        if i == 0:
            # Second-smallest entry of each column: nearest neighbour other than itself.
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            scores = dist[picks[:i]].min(dim=0).values
        picks[i] = torch.argmax(scores)
    return picks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def _phases(
    method: str, x: Tensor, k: int, official: types.SimpleNamespace | None = None
) -> tuple[Callable[[], Any], Callable[[Any], Tensor]]:
    """``(similarity(), greedy(state) -> picks)`` of one method."""
    from vtr.kernels import torch_impl

    m = x.shape[0]
    if method == "torch":
        return (
            lambda: torch_impl.maxmin_prepare_torch(x),
            lambda st: torch_impl.maxmin_greedy_torch(st[0], st[1], k, m, x.device),
        )
    if method == "triton":
        from vtr.kernels.dispatch import load_triton

        tri = load_triton()
        return (lambda: tri.maxmin_prepare(x)), (lambda st: tri.maxmin_greedy(st, k))
    if method == "naive":
        return (lambda: _naive_similarity(x)), (lambda dist: _naive_greedy(dist, k))
    if method == "official" and official is not None:
        # As in the official pipeline: the distance matrix first, then the loop on it (k / m rounds back to k).
        return (
            lambda: 1.0 - official.pairwise_cosine_similarity(x),
            lambda dist: official.DivPrune(x, m, cosine_matrix=dist, threshold_ratio=k / m)[0],
        )
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _measure(
    method: str,
    x: Tensor,
    k: int,
    repeats: int,
    warmup: int,
    tick: Callable[[], None],
    official: types.SimpleNamespace | None = None,
) -> tuple:
    """Median similarity and greedy ms, their sum, and the picks of the last run."""
    similarity, greedy = _phases(method, x, k, official)
    sims, greedies = [], []
    picks = None
    for i in range(warmup + repeats):
        t_sim, state = _timed(similarity, x.device)
        t_greedy, picks = _timed(partial(greedy, state), x.device)
        del state  # free the distance matrix before the next similarity phase
        if i >= warmup:
            sims.append(t_sim)
            greedies.append(t_greedy)
        tick()
    # The total is the sum of the phase medians, so the three columns add up.
    sim, greedy_ms = statistics.median(sims), statistics.median(greedies)
    return sim, greedy_ms, sim + greedy_ms, picks


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _fmt(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def markdown_table(rows: list[Row]) -> str:
    """Markdown table of ``rows`` with the speed-up of each method over the official loop (over the naive one
    when the official loop was not run)."""
    ref = "official" if any(r.method == "official" and r.total_ms is not None for r in rows) else "naive"
    baseline = {(r.m, r.k, r.d): r.total_ms for r in rows if r.method == ref}
    lines = [
        f"| M | K | D | method | similarity (ms) | greedy (ms) | total (ms) | vs {ref} | same picks as fallback |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.total_ms is None:
            cells = [r.note, "-", "-", "-"]
        else:
            base = baseline.get((r.m, r.k, r.d))
            speed = f"{base / r.total_ms:.1f}x" if base and r.total_ms > 0 else "-"
            cells = [_fmt(r.similarity_ms), _fmt(r.greedy_ms), _fmt(r.total_ms), speed]
        same = "-" if r.same_picks_as_fallback is None else ("yes" if r.same_picks_as_fallback else "NO")
        lines.append(f"| {r.m} | {r.k} | {r.d} | {r.method} | " + " | ".join(cells) + f" | {same} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the Markdown table and write ``<out>/kernels.json``. Returns 0."""
    from tqdm.auto import tqdm

    device = _device(args.device)
    on_cuda = device.type == "cuda"
    dtype = torch.float16 if on_cuda else torch.float32
    repeats = args.repeats if args.repeats is not None else (10 if on_cuda else 3)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    official = load_official(args.official) if getattr(args, "official", None) else None
    if official is None:
        print(f"official DivPrune loop: not compared ({NA_NO_OFFICIAL})", file=sys.stderr)
    methods = [m for m in METHODS if (on_cuda or m != "triton") and (official is not None or m != "official")]
    bar = tqdm(
        total=len(shapes) * len(methods) * (repeats + args.warmup), desc="kernels bench", disable=args.no_progress
    )
    rows: list[Row] = []
    for m, k, d in shapes:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype)
        if not on_cuda:
            rows.append(Row(m, k, d, "triton", None, None, None, None, NA_NO_CUDA))
        if official is None:
            rows.append(Row(m, k, d, "official", None, None, None, None, NA_NO_OFFICIAL))
        picks: dict[str, Tensor] = {}
        timings: dict[str, tuple[float, float, float]] = {}
        for method in methods:
            bar.set_postfix_str(f"M={m} {method}")
            *times, picks[method] = _measure(method, x, k, repeats, args.warmup, bar.update, official)
            timings[method] = tuple(times)
        ref = picks["torch"].sort().values
        for method in methods:
            same = bool(torch.equal(picks[method].sort().values, ref))
            rows.append(Row(m, k, d, method, *timings[method], same))
        del x, picks
    bar.close()
    table = markdown_table(rows)
    print(table)
    meta = {**_metadata(device, dtype, repeats, args), "official": official.source if official is not None else None}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels.json"
    path.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows], "table": table}, indent=2))
    (args.out / "kernels.md").write_text(table + "\n")
    print(f"\nwrote {path} and {args.out / 'kernels.md'}")
    return 0


def _metadata(device: torch.device, dtype: torch.dtype, repeats: int, args: argparse.Namespace) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "warmup": args.warmup,
        "quick": bool(args.quick),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vtr.bench.kernels``."""
    parser = argparse.ArgumentParser(prog="python -m vtr.bench.kernels", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
