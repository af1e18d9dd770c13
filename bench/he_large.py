"""Hyperspherical energy of one large layer: time and extra memory against the target
(issue 12: a 4096 × 4096 matrix in ≤ 10 s and ≤ 1 GiB extra memory on a 2-core CPU).

Each measurement runs in its own process, so the peak RSS it reports is its own: the weight is
made first, then the peak is read before and after `hyperspherical_energy` (the extra memory is
the difference). The dense n × n computation (`neuron_cosines`) is measured beside it where it
fits, as the reference value and the memory the blocks avoid.

    python bench/he_large.py                  # 4096 × 4096, float32 and float64, blocked and dense
    python bench/he_large.py --rows 14336     # an 8B model's MLP: 14336 × 4096
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def _measure(rows: int, cols: int, dtype: str, dense: bool, queue) -> None:
    import torch

    from stages.evaluate.geometry import hyperspherical_energy, neuron_cosines

    torch.set_num_threads(2)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    if dense:  # the n × n way: all cosines at once, then the same sum
        cos = neuron_cosines(w)
        inv = (2.0 - 2.0 * cos).clamp(min=1e-12).rsqrt()
        inv.fill_diagonal_(0.0)
        he = float(inv.sum())
    else:
        he = hyperspherical_energy(w, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - start
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20  # GiB
    queue.put({"rows": rows, "cols": cols, "method": "dense float64" if dense else f"blocked {dtype}",
               "seconds": round(seconds, 2), "extra_gib": round(extra, 3), "he": he})


def measure(rows: int, cols: int, dtype: str, dense: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(rows, cols, dtype, dense, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    results = [measure(args.rows, args.cols, "float32"), measure(args.rows, args.cols, "float64")]
    if args.rows <= 8192:
        results.append(measure(args.rows, args.cols, "float64", dense=True))
    for r in results:
        print(json.dumps(r))
    ref = results[-1]["he"]
    for r in results[:-1]:
        print(f"{r['method']}: {r['seconds']} s, +{r['extra_gib']} GiB, HE relative difference to the last line "
              f"{abs(r['he'] - ref) / ref:.1e}")


if __name__ == "__main__":
    main()
