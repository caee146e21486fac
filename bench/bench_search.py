"""Style search at scale: build time, memory, queries/s and recall@10 of the gallery's Faiss indexes.

    python bench/bench_search.py                       # 1M generated vectors of dimension 512 (a few minutes)
    python bench/bench_search.py --count 200000 --dim 256

Vectors are generated like style vectors of many artists: ``--artists`` random unit centres, each vector its centre
plus Gaussian noise, re-normalised. The approximate index (:func:`retrieval.index.build_index` above its exact
limit: IVF-Flat) is compared with exact inner-product search on ``--queries`` held-out vectors.
"""

import argparse
import resource
import time

import faiss
import numpy as np
from scale_common import clustered_vectors

from retrieval.index import build_index, search
from utils import run_cli


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    ids = search(index, queries, k)[1]
    return ids, len(queries) / (time.perf_counter() - start)


def main(args: argparse.Namespace | None = None) -> dict:
    args = args if args is not None else get_args_parser().parse_args()
    vectors = clustered_vectors(args.count + args.queries, args.dim, args.artists, args.noise, args.seed)
    queries, vectors = vectors[:args.queries], vectors[args.queries:]
    print(f"{args.count} vectors x {args.dim}, {args.queries} queries, {faiss.omp_get_max_threads()} Faiss threads; "
          f"vectors {vectors.nbytes / 2**30:.2f} GiB, peak RSS {peak_rss_gib():.2f} GiB")
    start = time.perf_counter()
    approx, params = build_index(vectors, exact_limit=args.exact_limit)
    build_s = time.perf_counter() - start
    print(f"approximate index {params}: built in {build_s:.1f}s, peak RSS {peak_rss_gib():.2f} GiB")
    found, approx_qps = timed_search(approx, queries, 10)
    del approx
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    truth, exact_qps = timed_search(exact, queries, 10)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)]))
    result = {"count": args.count, "dim": args.dim, "index": params, "build_s": build_s, "approx_qps": approx_qps,
              "exact_qps": exact_qps, "recall@10": recall, "peak_rss_gib": peak_rss_gib()}
    print(f"queries/s: approximate {approx_qps:.0f}, exact {exact_qps:.1f}; recall@10 of the approximate index vs "
          f"exact {recall:.3f}; peak RSS {result['peak_rss_gib']:.2f} GiB")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--artists", type=int, default=20_000, help="centres the vectors are drawn around")
    parser.add_argument("--noise", type=float, default=1.0, help="noise length relative to the unit centres")
    parser.add_argument("--exact-limit", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    run_cli(main)
