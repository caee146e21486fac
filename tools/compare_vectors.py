#!/usr/bin/env python3
"""Rank reference style vectors by cosine similarity to one or more query vectors.

Queries and references are ``.npy`` files: a single vector (D or 1 x D) or a matrix of N vectors (N x D, such as
the ``features.npy`` written by ``tools/extract_cluster_features.py``). A reference directory contributes every
``.npy`` directly inside it. A matrix's rows are named ``file.npy[i]``, or by ``--names`` (one name per line) when
exactly one reference matrix is given.

Cosine similarity ignores vector length, so L2 normalisation alone would change nothing; ``--normalize`` instead
centres every vector on the mean reference vector before the cosine. That removes what all references share and
spreads the scores, which helps when all similarities crowd near 1.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np

from analysis.vectors import format_table, rank_by_cosine
from artifacts.outputs import load_matrix, read_names
from utils import UserError, run_cli


def _row_names(label: str, count: int) -> list[str]:
    return [label] if count == 1 else [f"{label}[{i}]" for i in range(count)]


def load_queries(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Load query vectors; a single vector is named by its file, matrix rows ``file.npy[i]``."""
    matrix = load_matrix(path)
    return _row_names(str(path), len(matrix)), matrix


def load_references(
    paths: list[str | os.PathLike], names_path: str | os.PathLike | None = None
) -> tuple[list[str], np.ndarray]:
    """Collect reference vectors from files and directories (every ``.npy`` directly inside, sorted by name).

    Files reached twice are used once. ``names_path`` names the rows of the one reference holding several vectors.
    """
    files, seen = [], set()
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npy" and p.is_file())
        elif path.exists():
            found = [path]
        else:
            raise UserError(f"reference {path} does not exist; pass .npy files or directories that hold them")
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                files.append(file)
    if not files:
        raise UserError(f"no reference vectors: {', '.join(map(str, paths))} hold no .npy files; "
                        "pass .npy files or directories that hold them")
    matrices = [load_matrix(f) for f in files]
    for file, matrix in zip(files[1:], matrices[1:], strict=True):
        if matrix.shape[1] != matrices[0].shape[1]:
            raise UserError(f"reference {files[0]} has shape {matrices[0].shape} but {file} has shape {matrix.shape}; "
                            "all vectors must have the same length (use features from the same model)")
    names = [_row_names(str(f), len(m)) for f, m in zip(files, matrices, strict=True)]
    if names_path is not None:
        multi = [i for i, m in enumerate(matrices) if len(m) > 1]
        if len(multi) != 1:
            raise UserError(f"--names needs exactly one reference holding several vectors, got {len(multi)}; "
                            "pass the features.npy its names belong to (other references may be single vectors)")
        i = multi[0]
        names[i] = read_names(names_path)
        if len(names[i]) != len(matrices[i]):
            raise UserError(f"{names_path} has {len(names[i])} names but {files[i]} holds {len(matrices[i])} "
                            "vectors; they must match line for line")
    return [n for group in names for n in group], np.concatenate(matrices)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query-vector", required=True, help=".npy with one vector (D or 1 x D) or N x D queries")
    parser.add_argument("--reference-vectors", required=True, nargs="+",
                        help=".npy files and/or directories (each contributes every .npy directly inside)")
    parser.add_argument("--names", default=None,
                        help="names for the rows of the one reference matrix, one per line (image_names.txt)")
    parser.add_argument("--top-k", type=int, default=5, help="results per query (default 5)")
    parser.add_argument("--normalize", action="store_true",
                        help="centre all vectors on the mean reference vector before the cosine")
    parser.add_argument("--output", default=None, help="write the ranking to this JSON file")
    return parser


def main(args: argparse.Namespace | None = None) -> list[dict]:
    args = args if args is not None else get_args_parser().parse_args()
    query_names, queries = load_queries(args.query_vector)
    reference_names, references = load_references(args.reference_vectors, args.names)
    results = rank_by_cosine(queries, references, args.top_k, query_names, reference_names, args.normalize)
    print(format_table(results))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "metric": "cosine",
            "normalize": args.normalize,
            "top_k": args.top_k,
            "num_references": len(reference_names),
            "results": results,
        }
        output.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {output}")
    return results


if __name__ == "__main__":
    run_cli(main)
