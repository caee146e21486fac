"""The rows of the benchmark report (``bench/run_bench.py``): a measured ratio, its requirement and the verdict."""

from dataclasses import dataclass

from .benchmark import Result

__all__ = ["MAX_SPREAD", "Row", "parse_markdown_table", "spread"]

# Largest max/min images/s over the repeats of a compared entry for which a verdict is trusted: on an idle machine
# repeats agree within a few percent; a wider spread means other processes took the CPU during part of the run.
MAX_SPREAD = 1.5


@dataclass
class Row:
    """One line of the targets table."""

    target: str
    description: str
    measured: str
    ratio: float
    required: float
    command: str
    at_most: bool = False  # the ratio must stay at or below ``required`` (memory) instead of reaching it
    why: str = ""  # measured explanation, reported when the target is missed
    spread: float = 1.0  # largest max/min images/s over the repeats of the compared entries

    @property
    def passed(self) -> bool:
        return self.ratio <= self.required if self.at_most else self.ratio >= self.required

    @property
    def reliable(self) -> bool:
        return self.spread <= MAX_SPREAD

    @property
    def verdict(self) -> str:
        verdict = "pass" if self.passed else f"**miss** ({self.ratio / self.required - 1:+.0%} vs required)"
        if not self.reliable:
            verdict = (f"**unreliable** ({verdict} at the medians, but repeats vary up to {self.spread:.1f}x: the "
                       "machine was busy; rerun on an idle one)")
        return verdict

    def markdown(self) -> str:
        bound = "<=" if self.at_most else ">="
        return (f"| {self.target} | {self.description} | {self.measured} | {self.ratio:.2f}x | {bound} "
                f"{self.required:.2f}x | {self.verdict} | `{self.command}` |")


def parse_markdown_table(text: str) -> dict[str, dict[str, str]]:
    """``{first cell: {column header: cell}}`` of the first markdown table in ``text``."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.strip().startswith("|")]
    if len(rows) < 3:
        raise ValueError(f"no markdown table in:\n{text}")
    header = rows[0]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows[2:]}


def spread(*results: Result) -> float:
    """Largest max/min images/s over the repeats of ``results``."""
    return max(max(r.images_per_s) / min(r.images_per_s) for r in results)
