"""Tests for tools/make_medium_world.py: artists share a medium and differ in its parameters; a long tail."""

import itertools

import numpy as np
import pytest
from PIL import Image

from tools.make_medium_world import FAMILIES, get_args_parser, long_tail_counts, main, medium_styles
from utils import UserError


def test_artists_of_a_family_share_the_medium_and_differ_in_two_parameters():
    styles = medium_styles(["ink", "dots"], 12, seed=0)
    assert [s.name for s in styles[:3]] == ["ink_01", "dots_02", "ink_03"]
    for family, (medium, grid) in FAMILIES.items():
        members = [s for s in styles if s.name.startswith(family)]
        assert len(members) == (6 if family in ("ink", "dots") else 0)
        for a, b in itertools.combinations(members, 2):
            assert (a.fill, a.paper, a.ink, a.hues) == (b.fill, b.paper, b.ink, b.hues) == (
                medium.fill, medium.paper, medium.ink, medium.hues)
            assert sum(getattr(a, p) != getattr(b, p) for p in grid) >= 2, (a, b)
    assert medium_styles(["ink", "dots"], 12, seed=1) != styles  # the seed picks other artists
    with pytest.raises(UserError, match="unknown --families oil"):
        medium_styles(["oil"], 4, 0)
    with pytest.raises(UserError, match="distinct artists"):
        medium_styles(["paint"], 200, 0)


def test_long_tail_counts():
    assert long_tail_counts(12, 30, 6) == [30, 26, 22, 19, 17, 14, 12, 11, 9, 8, 7, 6]
    assert long_tail_counts(2, 5, 5) == [5, 5]
    with pytest.raises(UserError):
        long_tail_counts(3, 4, 6)


def test_world_files_are_written_deterministically(tmp_path):
    argv = ["--families", "pixel", "paint", "--artists", "4", "--most", "3", "--fewest", "1", "--size", "40"]
    counts = main(get_args_parser().parse_args(["--output-dir", str(tmp_path / "a"), *argv]))
    main(get_args_parser().parse_args(["--output-dir", str(tmp_path / "b"), *argv]))
    assert counts == {"pixel_01": 3, "paint_02": 2, "pixel_03": 1, "paint_04": 1}
    for name, count in counts.items():
        files = sorted((tmp_path / "a" / name).iterdir())
        assert len(files) == count
        for path in files:
            with Image.open(path) as image, Image.open(tmp_path / "b" / name / path.name) as again:
                assert image.size == (40, 40) and np.array_equal(np.asarray(image), np.asarray(again))
