"""build_dataset / RobustImageFolder (pre-filter, cache, surviving broken files), transforms, samplers, scanning."""

import os
from pathlib import Path

import imagegen as gen
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torchvision import transforms

from data.class_mapping import compare_class_mappings, read_class_mapping, write_class_mapping
from data.datasets import build_dataset, build_transform, scan_split
from data.images import load_image, median_short_side
from data.prepare import prepare_dataset
from data.samplers import EpochRepeats, RASampler, build_sampler
from data.scan import CACHE_FILE, ScanCache, verify_images, walk_files
from training.config import AugmentConfig
from utils import UserError

SIZE = (20, 16)


def split(is_train: bool, root: Path, workers: int = 0, verbose: bool = True):
    """The split's dataset (32 px transforms) and its scan."""
    scan = scan_split(is_train, root, workers=workers, verbose=verbose)
    return build_dataset(scan, AugmentConfig().transform(32)), scan


def layout(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    """A prepared-looking ``root/{train,val}/<class>/`` tree of valid images."""
    gen.artist_folders(root / "train", train, SIZE)
    gen.artist_folders(root / "val", val, SIZE)
    return root


def corrupt_keeping_stat(path: Path) -> None:
    """Overwrite with garbage of the same size and restore the mtime: only a cache can still call it valid."""
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_build_dataset_on_prepare_output(tmp_path):
    src = gen.artist_folders(tmp_path / "src", {"b": 5, "a": 5, "日本": 4}, SIZE)
    out = tmp_path / "out"
    prepare_dataset(src, out, min_images=1, workers=0, verbose=False)
    train, scan = split(True, out)
    val, _ = split(False, out)
    assert len(scan.classes) == 3 and train.classes == val.classes == ["a", "b", "日本"]
    assert (len(train), len(val)) == (11, 3)
    image, target = train[0]
    assert image.shape == (3, 32, 32) and target == 0
    # prepare recorded its verification: a file broken without changing size/mtime is not decoded again
    victim = Path(train.samples[-1][0])
    corrupt_keeping_stat(victim)
    again, _ = split(True, out)
    assert str(victim) in [p for p, _ in again.samples]


def test_corrupt_images_are_filtered_with_a_warning_each(tmp_path, capsys):
    root = layout(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1})
    bad = [gen.truncated_jpeg(root / "train" / "a" / "cut.jpg"), gen.text_file(root / "train" / "b" / "fake.png")]
    dataset, scan = split(True, root)
    out = capsys.readouterr().out
    assert f"warning: skipping {bad[0]}: truncated" in out and f"warning: skipping {bad[1]}: not an image" in out
    assert len(dataset) == 6 and {p for p, _ in scan.rejected} == {str(p) for p in bad}
    split(True, root, verbose=False)
    assert "warning" not in capsys.readouterr().out


def test_scan_cache_is_keyed_by_size_and_mtime(tmp_path):
    root = layout(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1})
    split(True, root, workers=2)
    assert (root / CACHE_FILE).is_file()
    victim = root / "train" / "a" / "img_001.png"
    corrupt_keeping_stat(victim)
    cached, _ = split(True, root)
    assert len(cached) == 6, "an unchanged (size, mtime) must come from the cache, not be decoded again"
    os.utime(victim, ns=(0, 10**18))
    rescanned, scan = split(True, root)
    assert len(rescanned) == 5 and scan.rejected[0][0] == str(victim)


def test_unwritable_cache_is_reported_and_scan_still_works(tmp_path, capsys):
    good, bad = gen.noise_image(tmp_path / "ok.png"), gen.empty_file(tmp_path / "bad.png")
    blocked = gen.text_file(tmp_path / "a-file")
    reasons = verify_images([good, bad], cache=ScanCache(blocked / CACHE_FILE, tmp_path))
    assert reasons[0] is None and reasons[1].startswith("empty file")
    assert "could not be written" in capsys.readouterr().out


def test_file_broken_after_the_scan_does_not_break_the_epoch(tmp_path, capsys):
    root = layout(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1})
    dataset, _ = split(True, root)
    broken = root / "train" / "a" / "img_002.png"
    broken.write_bytes(b"\x89PNG garbage")
    for _ in range(2):
        images, targets = next(iter(DataLoader(dataset, batch_size=len(dataset), num_workers=0)))
        assert images.shape == (6, 3, 32, 32) and targets.tolist() == [0, 0, 1, 1, 1, 1]
    assert capsys.readouterr().out.count(f"skipping unreadable image {broken}") == 1


def test_val_without_some_classes_keeps_train_ids(tmp_path):
    root = layout(tmp_path, {"a": 2, "b": 2, "c": 2}, {"a": 1, "c": 1})
    train, _ = split(True, root)
    val, scan = split(False, root)
    assert len(scan.classes) == 3 and val.class_to_idx == train.class_to_idx == {"a": 0, "b": 1, "c": 2}
    assert val.targets == [0, 2]


def test_class_mapping_decides_ids_and_must_match_folders(tmp_path):
    root = layout(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1})
    write_class_mapping(root / "class_mapping.csv", ["b", "a"])
    dataset, _ = split(True, root)
    assert dataset.class_to_idx == {"b": 0, "a": 1} and dataset[0][1] == 1
    write_class_mapping(root / "class_mapping.csv", ["a", "b", "c"])
    with pytest.raises(UserError, match="no folder for: c"):
        split(True, root)


def test_missing_or_empty_splits_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="prepare_dataset.py"):
        split(True, tmp_path)
    gen.artist_folders(tmp_path / "train", {"a": 2}, SIZE)
    with pytest.raises(UserError, match="val"):
        split(False, tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(UserError, match="no readable image.*empty"):
        split(True, tmp_path)


def test_train_transform_is_timm_randaugment_with_erasing(tmp_path):
    transform = build_transform(True, AugmentConfig().transform(32))
    steps = transform.transforms
    assert isinstance(steps[0], RandomResizedCropAndInterpolation) and steps[0].interpolation.value == "bicubic"
    assert any(isinstance(t, RandAugment) for t in steps)
    assert any(isinstance(t, RandomErasing) and t.probability == 0.25 for t in steps)
    image = load_image(gen.noise_image(tmp_path / "x.png", (50, 40)))
    assert transform(image).shape == (3, 32, 32)


def test_eval_transforms(tmp_path):
    image = load_image(gen.noise_image(tmp_path / "x.png", (50, 40)))
    resize_crop = build_transform(False, AugmentConfig().transform(224)).transforms[0]  # inference's
    assert resize_crop.scale_size == 256 and resize_crop.resample == Image.Resampling.BICUBIC
    assert resize_crop.size == (224, 224)
    evaluation = build_transform(False, AugmentConfig().transform(32))
    assert evaluation.transforms[0].scale_size == 36 and evaluation(image).shape == (3, 32, 32)
    assert evaluation(image).dtype == torch.float32
    finetune = build_transform(False, AugmentConfig().transform(32, squash=True))
    assert finetune.transforms[0].scale_size == (32, 32) and finetune(image).shape == (3, 32, 32)


def test_three_augment(tmp_path):
    transform = build_transform(True, AugmentConfig(three_augment=True).transform(32))
    choice = next(t for t in transform.transforms if isinstance(t, transforms.RandomChoice))
    assert [type(t).__name__ for t in choice.transforms] == ["Grayscale", "Solarization", "GaussianBlur"]
    assert any(isinstance(t, transforms.ColorJitter) for t in transform.transforms)
    assert not any(isinstance(t, RandomErasing) for t in transform.transforms)
    image = load_image(gen.noise_image(tmp_path / "x.png", (50, 40)))
    assert transform(image).shape == (3, 32, 32)


def test_ra_sampler_repeats_across_replicas():
    dataset = list(range(10))
    ranks = [RASampler(dataset, num_replicas=2, rank=r, num_repeats=3, seed=1) for r in range(2)]
    per_rank = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [5, 5] and [len(i) for i in per_rank] == [5, 5]
    # every image is sent to the ranks in consecutive repeats: rank 0 and rank 1 see the same image at step 0
    assert per_rank[0][0] == per_rank[1][0]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != per_rank[0]
    single = RASampler(dataset, num_replicas=1, rank=0, num_repeats=2)
    order = list(single)
    assert len(order) == 10 and order[0::2] == order[1::2]
    assert len(list(RASampler([0], num_replicas=4, rank=3))) == 1
    with pytest.raises(ValueError):
        RASampler(dataset, num_replicas=2, rank=2)


def test_epoch_repeats_passes_over_the_data_in_new_orders():
    base = torch.utils.data.DistributedSampler(list(range(10)), num_replicas=1, rank=0, seed=3)
    sampler = EpochRepeats(base, 3)
    first = list(sampler)
    assert len(sampler) == len(first) == 30 and sorted(first) == sorted(list(range(10)) * 3)
    assert first[:10] != first[10:20] and list(sampler) == first  # passes differ; an epoch is reproducible
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)
    with pytest.raises(ValueError):
        EpochRepeats(base, 0)


def test_median_short_side(tmp_path):
    paths = [gen.noise_image(tmp_path / f"{i}.png", size) for i, size in enumerate([(50, 40), (90, 70), (30, 80)])]
    assert median_short_side([*paths, tmp_path / "missing.png"]) == 40 and median_short_side([]) is None


def test_build_sampler_single_process():
    dataset = list(range(7))
    assert isinstance(build_sampler(dataset, True), RandomSampler)
    assert isinstance(build_sampler(dataset, True, repeated_aug=True), RASampler)
    assert isinstance(build_sampler(dataset, False, dist_eval=True), SequentialSampler)
    assert torch.distributed.is_initialized() is False


def test_walk_files_skips_hidden_folders_and_survives_symlink_loops(tmp_path):
    gen.text_file(tmp_path / "a" / "1.txt")
    gen.text_file(tmp_path / "a" / ".ipynb_checkpoints" / "2.txt")
    gen.text_file(tmp_path / "a" / "sub" / "3.txt")
    (tmp_path / "a" / "sub" / "loop").symlink_to(tmp_path / "a")
    names = [p.relative_to(tmp_path / "a").as_posix() for p in walk_files(tmp_path / "a")]
    assert names == ["1.txt", "sub/3.txt"]
    assert [p.name for p in walk_files(tmp_path / "a", recursive=False)] == ["1.txt"]


def test_class_mapping_round_trip_with_awkward_names(tmp_path):
    names = ["Alice", 'say "hi", ok', "葛飾北斎", "Claude Monet (1840)", " leading space"]
    write_class_mapping(tmp_path / "m.csv", names)
    assert read_class_mapping(tmp_path / "m.csv") == names
    (tmp_path / "bom.csv").write_bytes("\ufeffclass_id,class_name\n1,b\n0,a\n".encode())
    assert read_class_mapping(tmp_path / "bom.csv") == ["a", "b"]


@pytest.mark.parametrize("text, message", [
    ("0,a\n", "line 1: expected the header"),
    ("class_id,class_name\n0,a\nx,b\n", "line 3: class_id 'x' is not an integer"),
    ("class_id,class_name\n0,a\n0,b\n", "line 3: class_id 0 appears twice"),
    ("class_id,class_name\n0,a\n2,b\n", "missing ids 1"),
    ("class_id,class_name\n0,a\n1,a\n", "'a' appears twice"),
    ("class_id,class_name\n0,a\n1, \n", "empty name"),
    ("class_id,class_name\n0,a,b\n", "line 2: expected 2 fields"),
])
def test_class_mapping_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "m.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message) as info:
        read_class_mapping(path)
    assert str(path) in str(info.value)


def test_class_mapping_missing_or_not_utf8(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_class_mapping(tmp_path / "none.csv")
    (tmp_path / "latin.csv").write_bytes("class_id,class_name\n0,Dürer\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        read_class_mapping(tmp_path / "latin.csv")
    with pytest.raises(UserError, match="appears twice"):
        write_class_mapping(tmp_path / "dup.csv", ["a", "a"])


def test_compare_class_mappings():
    assert compare_class_mappings(["a", "b"], ["a", "b"]) == []
    assert compare_class_mappings(["a", "b", "c"], ["a", "x"]) == [
        "3 classes in the checkpoint, 2 in the dataset",
        "id 1: 'b' in the checkpoint, 'x' in the dataset",
        "id 2: 'c' in the checkpoint, (none) in the dataset",
    ]
    many = compare_class_mappings([str(i) for i in range(30)], [f"n{i}" for i in range(30)], limit=5)
    assert len(many) == 6 and many[-1] == "... and 25 more ids differ"


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "original"])
def test_posterize_to_zero_bits_does_not_crash(tmp_path, aa):
    """timm asks for 0 bits at high (increasing) or low (plain) magnitudes; Pillow >= 11 raises on that."""
    transform = build_transform(True, AugmentConfig(auto_augment=aa).transform(32))
    posterize_ops = [
        sub for step in transform.transforms for op in (getattr(step, "ops", None) or getattr(step, "policy", []))
        for sub in (op if isinstance(op, (list, tuple)) else [op]) if "Posterize" in sub.name
    ]
    assert posterize_ops
    image = load_image(gen.noise_image(tmp_path / "noise.png"))
    for op in posterize_ops:
        out = op.aug_fn(image, 0)
        assert out.size == image.size and len(out.getcolors(maxcolors=256)) > 1  # one bit kept, not all black
