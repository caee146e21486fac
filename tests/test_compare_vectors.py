"""tools/compare_vectors.py and analysis/vectors.py: cosine ranking, matrices and names, --normalize, JSON, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.vectors import format_table, rank_by_cosine
from tools.compare_vectors import get_args_parser, load_references, main
from utils import UserError

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "compare_vectors.py"
DIM = 32


@pytest.fixture
def refs(tmp_path):
    """A directory of five single-vector references (mixed 1-D and 1 x D) plus a non-.npy file to ignore."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, DIM)).astype(np.float32)
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    for i, v in enumerate(vectors):
        np.save(ref_dir / f"ref_{i}.npy", v if i % 2 else v[None])
    (ref_dir / "notes.txt").write_text("not a vector")
    return ref_dir, vectors


def _run(tmp_path, *args):
    return main(get_args_parser().parse_args([*map(str, args), "--output", str(tmp_path / "out.json")]))


def test_known_nearest_vector_ranks_first(tmp_path, refs, capsys):
    ref_dir, vectors = refs
    query = vectors[3] * 7 + np.random.default_rng(1).normal(scale=0.01, size=DIM)  # length must not matter
    np.save(tmp_path / "q.npy", query)
    results = _run(tmp_path, "--query-vector", tmp_path / "q.npy", "--reference-vectors", ref_dir, "--top-k", 3)
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert results[0]["reference"] == str(ref_dir / "ref_3.npy") and results[0]["similarity"] > 0.999
    assert results[0]["similarity"] > results[1]["similarity"] >= results[2]["similarity"]

    report = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert report["metric"] == "cosine" and report["num_references"] == 5 and report["results"] == results
    table = capsys.readouterr().out
    assert f"query: {tmp_path / 'q.npy'}" in table and "ref_3.npy" in table.splitlines()[2]


def test_cosine_values_match_numpy(refs):
    _, vectors = refs
    names = [f"r{i}" for i in range(5)]
    query = vectors[:1] + vectors[1:2]
    results = rank_by_cosine(query, vectors, 5, ["q"], names)
    expected = vectors @ query[0] / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query[0]))
    assert {r["reference"]: r["similarity"] for r in results} == pytest.approx(dict(zip(names, expected, strict=True)))


def test_multiple_queries_against_a_matrix_with_names(tmp_path, refs):
    ref_dir, vectors = refs
    matrix = np.random.default_rng(2).normal(size=(6, DIM)).astype(np.float32)
    np.save(tmp_path / "features.npy", matrix)
    (tmp_path / "image_names.txt").write_text("".join(f"画家 A/{i}.jpg\n" for i in range(6)), encoding="utf-8")
    np.save(tmp_path / "queries.npy", matrix[[4, 1]] * 3)
    results = _run(tmp_path, "--query-vector", tmp_path / "queries.npy", "--top-k", 2, "--names",
                   tmp_path / "image_names.txt", "--reference-vectors", tmp_path / "features.npy", ref_dir)
    assert len(results) == 4
    firsts = {r["query"]: r["reference"] for r in results if r["rank"] == 1}
    queries = tmp_path / "queries.npy"
    assert firsts == {f"{queries}[0]": "画家 A/4.jpg", f"{queries}[1]": "画家 A/1.jpg"}
    report = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert report["num_references"] == 11


def test_matrix_rows_are_indexed_without_names_and_duplicates_count_once(tmp_path, refs):
    ref_dir, _ = refs
    np.save(ref_dir / "many.npy", np.eye(3, DIM, dtype=np.float32))
    names, matrix = load_references([ref_dir, ref_dir / "ref_0.npy"])
    assert len(names) == len(matrix) == 8 and len(set(names)) == 8
    assert [n for n in names if "many" in n] == [f"{ref_dir / 'many.npy'}[{i}]" for i in range(3)]


def test_top_k_larger_than_references_returns_all(refs):
    _, vectors = refs
    results = rank_by_cosine(vectors[:1], vectors, 50, ["q"], [f"r{i}" for i in range(5)])
    assert len(results) == 5 and results[0]["reference"] == "r0"


def test_normalize_centres_on_the_reference_mean():
    rng = np.random.default_rng(3)
    common = rng.normal(size=DIM) * 50  # a component every vector shares crowds plain cosine near 1
    references = common + np.eye(6, DIM)
    query = (common + np.eye(6, DIM)[2] + rng.normal(scale=0.05, size=DIM))[None]
    names = [f"r{i}" for i in range(6)]
    plain = rank_by_cosine(query, references, 6, ["q"], names)
    centred = rank_by_cosine(query, references, 6, ["q"], names, normalize=True)
    assert plain[0]["reference"] == centred[0]["reference"] == "r2"
    assert plain[0]["similarity"] - plain[-1]["similarity"] < 0.01
    assert centred[0]["similarity"] > 0.9 and centred[-1]["similarity"] < 0


def test_format_table_has_one_block_per_query():
    records = [{"query": q, "rank": r, "reference": f"{q}{r}", "similarity": 1 / r} for q in "ab" for r in (1, 2)]
    lines = format_table(records).splitlines()
    assert lines[0] == "query: a" and lines[4] == "" and lines[5] == "query: b" and len(lines) == 9


@pytest.mark.parametrize("matrices, message", [(0, "got 0"), (2, "got 2")])
def test_names_need_exactly_one_matrix(tmp_path, refs, matrices, message):
    ref_dir, _ = refs
    for i in range(matrices):
        np.save(ref_dir / f"m{i}.npy", np.ones((3, DIM)))
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    with pytest.raises(UserError, match=message):
        load_references([ref_dir], tmp_path / "names.txt")


def test_normalize_with_one_reference_is_an_error(refs):
    _, vectors = refs
    with pytest.raises(UserError, match="at least 2 references"):
        rank_by_cosine(vectors[:1], vectors[:1], 1, ["q"], ["r"], normalize=True)


def _cli_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Write the files for one error case; returns the CLI arguments and a fragment of the expected message."""
    good = np.ones((1, DIM), np.float32)
    np.save(tmp_path / "q.npy", good)
    (tmp_path / "empty").mkdir()
    if case == "dimension":
        np.save(tmp_path / "r.npy", np.ones((4, 16)))
        return ["--reference-vectors", tmp_path / "r.npy"], f"shape (1, {DIM}) but the references have shape (4, 16)"
    if case == "empty":
        return ["--reference-vectors", tmp_path / "empty"], "no reference vectors"
    if case == "nan":
        np.save(tmp_path / "q.npy", np.full(DIM, np.nan))
        np.save(tmp_path / "r.npy", good)
        return ["--reference-vectors", tmp_path / "r.npy"], "NaN"
    if case == "zero":
        np.save(tmp_path / "r.npy", np.vstack([good, np.zeros((1, DIM))]))
        return ["--reference-vectors", tmp_path / "r.npy"], "r.npy[1] is a zero vector"
    if case == "names":
        np.save(tmp_path / "r.npy", np.ones((3, DIM)))
        (tmp_path / "names.txt").write_text("a\nb\n")
        return ["--reference-vectors", tmp_path / "r.npy", "--names", tmp_path / "names.txt"], "has 2 names but"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["dimension", "empty", "nan", "zero", "names"])
def test_cli_errors_are_one_line(tmp_path, case):
    args, message = _cli_case(tmp_path, case)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--query-vector", str(tmp_path / "q.npy"), *map(str, args)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
