"""Turn ``source_dir/<artist>/<images...>`` into the ``train/`` + ``val/`` ImageFolder layout with metadata.

Every candidate image is decoded; bad files are rejected with their reason. The split is stratified per class and
deterministic for a seed. The new dataset is built in a staging folder inside the output dir and moved into place
at the end, so a failure leaves the previous output as it was; the source dir is only ever read.
"""

import errno
import json
import math
import os
import random
import shlex
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path

from tqdm import tqdm

from utils import UserError

from .class_mapping import CLASS_MAPPING_FILE, control_characters, write_class_mapping
from .images import is_image_file
from .scan import CACHE_FILE, ScanCache, default_workers, verify_images, walk_files

__all__ = ["LINK_MODES", "METADATA_FILES", "NEXT_COMMAND", "confirm_overwrite", "prepare_dataset", "val_count"]

LINK_MODES = ("copy", "symlink", "hardlink")
SPLITS = ("train", "val")
METADATA_FILES = (CLASS_MAPPING_FILE, "class_names.json", "dataset_info.json", "split_info.txt")
STAGING_DIR = ".prepare_dataset.tmp"
# The command printed at the end; {data_path} is the (shell-quoted) output dir.
NEXT_COMMAND = "python train_artist_style.py --data-path {data_path} --model lsnet_t_artist --output-dir runs/artist"
PREVIEW = 10  # how many rejected files / skipped classes are listed on screen
DESTINATION_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@dataclass
class ClassSplit:
    name: str
    valid: int
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)


def prepare_dataset(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    val_ratio: float = 0.2,
    min_images: int = 10,
    seed: int = 0,
    link: str = "copy",
    max_images_per_class: int | None = None,
    workers: int | None = None,
    assume_yes: bool = False,
    verbose: bool = True,
) -> dict:
    """Build ``output_dir/{train,val}/<artist>/`` and its metadata from ``source_dir``; return the dataset info.

    Args:
        source_dir: one folder per artist, images anywhere below it. Never modified.
        output_dir: gets ``train/``, ``val/`` and :data:`METADATA_FILES`; other files in it are left alone.
        val_ratio: share of each class that goes to ``val/`` (every class with 2+ images gets one when > 0).
        min_images: classes with fewer valid images are skipped.
        seed: the split (and the ``max_images_per_class`` subsample) is a function of the seed and the class.
        link: ``copy``, ``symlink`` or ``hardlink`` the images.
        max_images_per_class: keep at most this many images of a class (a seeded random subset).
        workers: processes that decode images (default: all usable cores).
        assume_yes: replace an existing dataset in ``output_dir`` without asking.
        verbose: show progress bars and print the summary.
    """
    source, output = Path(source_dir), Path(output_dir)
    workers = default_workers() if workers is None else workers
    _check_arguments(val_ratio, min_images, link, max_images_per_class, workers)
    _check_locations(source, output)
    existing = [name for name in SPLITS + METADATA_FILES if os.path.lexists(output / name)]
    if existing:
        confirm_overwrite(f"{output} already holds a dataset ({', '.join(existing)}).", assume_yes)

    candidates, ignored = _discover(source, verbose)
    valid, rejected = _verify(source, candidates, workers, verbose)
    splits, skipped = _split(valid, val_ratio, min_images, seed, max_images_per_class)
    if not splits:
        raise UserError(
            f"no artist folder in {source} has at least {min_images} valid images ({len(candidates)} folders, "
            f"{len(rejected)} files rejected); lower --min-images or check --source-dir"
        )
    if len(splits) == 1:
        print(f"warning: only one class ({splits[0].name!r}) is usable: training needs at least two classes; add "
              "another artist folder to --source-dir (or lower --min-images)", flush=True)
    info = _dataset_info(splits, skipped, rejected, ignored, dict(
        source_dir=str(source.absolute()), output_dir=str(output.absolute()), val_ratio=val_ratio,
        min_images=min_images, seed=seed, link=link, max_images_per_class=max_images_per_class, workers=workers,
    ))

    _build(source, output, splits, info, link, workers, verbose)
    if verbose:
        _print_summary(info, output)
    return info


def _verify(source: Path, candidates: dict[str, list[str]], workers: int,
            verbose: bool) -> tuple[dict[str, list[str]], list[dict]]:
    """Decode every candidate: the valid files per class, and ``{"path", "reason"}`` of each rejected one."""
    paths = [source / name / rel for name, rels in candidates.items() for rel in rels]
    reasons = iter(verify_images(paths, workers=workers, verbose=verbose, desc="verifying images"))
    valid: dict[str, list[str]] = {}
    rejected = []
    for name, rels in candidates.items():
        valid[name] = []
        for rel in rels:
            reason = next(reasons)
            if reason is None:
                valid[name].append(rel)
            else:
                rejected.append({"path": f"{name}/{Path(rel).as_posix()}", "reason": reason})
    return valid, rejected


def _build(source: Path, output: Path, splits: list[ClassSplit], info: dict, link: str, workers: int,
           verbose: bool) -> None:
    """Place the files and write the metadata in a staging folder, then swap it into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    staging = output / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    try:
        placed = _place_files(source, staging, splits, link, workers, verbose)
        _write_metadata(staging, splits, info)
        cache_error = ScanCache(staging / CACHE_FILE, staging).record(placed, [None] * len(placed))
        if cache_error and verbose:
            print(f"note: could not write the image scan cache ({cache_error}); training will verify the images")
        _move_into_place(staging, output)
    except OSError as err:
        raise _write_error(err.filename or staging, err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def confirm_overwrite(what: str, assume_yes: bool) -> None:
    """Ask y/N on a terminal before replacing ``what``; without a terminal refuse unless ``assume_yes``."""
    if assume_yes:
        return
    if not sys.stdin or not sys.stdin.isatty():
        raise UserError(f"{what} Not replacing it without confirmation: pass --yes to replace it")
    try:
        answer = input(f"{what} Replace it? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise UserError("cancelled; nothing was changed")


def _check_arguments(val_ratio, min_images, link, max_images_per_class, workers) -> None:
    if not 0 <= val_ratio < 1:
        raise UserError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if min_images < 1:
        raise UserError(f"--min-images must be at least 1, got {min_images}")
    if link not in LINK_MODES:
        raise UserError(f"link mode must be one of {', '.join(LINK_MODES)}, got {link!r}")
    if max_images_per_class is not None and max_images_per_class < 1:
        raise UserError(f"--max-images-per-class must be at least 1, got {max_images_per_class}")
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")


def _check_locations(source: Path, output: Path) -> None:
    if not source.is_dir():
        raise UserError(f"source dir {source} does not exist or is not a folder; pass --source-dir <artists folder>")
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents:
        raise UserError(
            f"output dir {output} is inside the source dir {source}; choose an output dir outside it "
            "(the source is never modified)"
        )
    for name in SPLITS + (STAGING_DIR,):
        owned = out / name
        if owned == src or owned in src.parents:
            raise UserError(
                f"source dir {source} is inside {owned}, which prepare_dataset.py replaces; choose another output dir"
            )
    if output.exists() and not output.is_dir():
        raise UserError(f"output dir {output} exists and is not a folder; choose another --output-dir")


def _discover(source: Path, verbose: bool) -> tuple[dict[str, list[str]], int]:
    """Image files per artist folder (paths relative to it, sorted) and the count of other files ignored."""
    folders = sorted(e.name for e in os.scandir(source) if e.is_dir() and not e.name.startswith("."))
    ignored = sum(1 for e in os.scandir(source) if not e.is_dir())
    candidates = {}
    for name in tqdm(folders, desc="scanning folders", unit="class", disable=not verbose):
        images = []
        for path in walk_files(source / name):
            if is_image_file(path.name):
                images.append(os.path.relpath(path, source / name))
            else:
                ignored += 1
        candidates[name] = images
    return candidates, ignored


def _split(
    valid: dict[str, list[str]], val_ratio: float, min_images: int, seed: int, max_images: int | None
) -> tuple[list[ClassSplit], list[dict]]:
    splits, skipped = [], []
    for name in sorted(valid):
        files = sorted(valid[name])
        control = control_characters(name)
        if control:
            skipped.append({"class_name": name, "valid_images": len(files), "reason": "the folder name contains "
                            f"control characters ({' '.join(control)}): rename the folder"})
            continue
        if len(files) < min_images:
            skipped.append({"class_name": name, "valid_images": len(files),
                            "reason": f"{len(files)} valid images, fewer than --min-images {min_images}"})
            continue
        rng = random.Random(f"{seed}/{name}")  # per class: adding an artist does not reshuffle the others
        if max_images is not None and len(files) > max_images:
            files = sorted(rng.sample(files, max_images))
        shuffled = rng.sample(files, len(files))
        n_val = val_count(len(files), val_ratio)
        splits.append(ClassSplit(name, len(valid[name]), sorted(shuffled[n_val:]), sorted(shuffled[:n_val])))
    return splits, skipped


def val_count(n: int, val_ratio: float) -> int:
    """Validation share of ``n`` items: rounded, at least 1 when ``val_ratio`` > 0 and n >= 2, never all of them."""
    if val_ratio <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * val_ratio + 0.5)))


def _destinations(files: list[str]) -> list[str]:
    """Sub-folders are kept, so equal names in different sub-folders stay apart; names that would only differ by
    case (one file on case-insensitive disks) get a " (n)" suffix."""
    taken: set[str] = set()
    result = []
    for rel in files:
        stem, suffix = os.path.splitext(rel)
        dest, n = rel, 1
        while dest.lower() in taken:
            dest, n = f"{stem} ({n}){suffix}", n + 1
        taken.add(dest.lower())
        result.append(dest)
    return result


def _place_files(source: Path, staging: Path, splits: list[ClassSplit], link: str, workers: int,
                 verbose: bool) -> list[str]:
    jobs = []
    for split in splits:
        for subset, files in (("train", split.train), ("val", split.val)):
            for rel, dest in zip(files, _destinations(files), strict=True):
                jobs.append((str((source / split.name / rel).absolute()), str(staging / subset / split.name / dest)))
    for subset in SPLITS:
        (staging / subset).mkdir(parents=True)
    for parent in sorted({os.path.dirname(dest) for _, dest in jobs}):
        os.makedirs(parent, exist_ok=True)

    place = {"copy": shutil.copy2, "hardlink": os.link, "symlink": os.symlink}[link]

    def place_one(job: tuple[str, str]) -> None:
        try:
            place(*job)
        except OSError as err:
            if link == "hardlink" and err.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise UserError(
                    f"cannot hard-link into {staging.parent} ({err.strerror}): hard links need the source and "
                    "output on the same filesystem; use --symlink or copy (the default)"
                ) from None
            # a full or read-only output disk is the destination's problem, whatever file the error names
            raise _write_error(job[1] if err.errno in DESTINATION_ERRNOS else err.filename or job[1], err) from None

    with ThreadPool(max(1, min(32, 2 * workers))) as pool, \
            tqdm(total=len(jobs), desc=f"{link}ing images", unit="img", disable=not verbose) as bar:
        for _ in pool.imap_unordered(place_one, jobs, chunksize=64):
            bar.update()
    return [dest for _, dest in jobs]


def _write_error(path: str | os.PathLike, err: OSError) -> UserError:
    return UserError(f"cannot write {path}: {err.strerror or err}; check the free space and permissions of the "
                     "output dir (the previous output was left as it was)")


def _dataset_info(splits, skipped, rejected, ignored, arguments) -> dict:
    n_train = sum(len(s.train) for s in splits)
    n_val = sum(len(s.val) for s in splits)
    return {
        "source_dir": arguments["source_dir"],
        "output_dir": arguments["output_dir"],
        "seed": arguments["seed"],
        "arguments": arguments,
        "num_classes": len(splits),
        "totals": {
            "train": n_train, "val": n_val, "images": n_train + n_val, "rejected_files": len(rejected),
            "skipped_classes": len(skipped), "ignored_files": ignored,
        },
        "classes": {
            s.name: {"class_id": i, "valid_images": s.valid, "train": len(s.train), "val": len(s.val)}
            for i, s in enumerate(splits)
        },
        "skipped_classes": skipped,
        "rejected_files": rejected,
    }


def _write_metadata(staging: Path, splits: list[ClassSplit], info: dict) -> None:
    names = [s.name for s in splits]
    write_class_mapping(staging / CLASS_MAPPING_FILE, names)
    (staging / "class_names.json").write_text(json.dumps(names, ensure_ascii=False, indent=1) + "\n", "utf-8")
    (staging / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=1) + "\n", "utf-8")
    (staging / "split_info.txt").write_text(_split_report(info), "utf-8")


def _split_report(info: dict) -> str:
    totals, args = info["totals"], info["arguments"]
    lines = [
        "Dataset split",
        f"source: {info['source_dir']}",
        f"output: {info['output_dir']}",
        "arguments: " + ", ".join(f"{k}={v}" for k, v in args.items() if k not in ("source_dir", "output_dir")),
        "",
        f"classes: {info['num_classes']}",
        f"images: {totals['images']} (train {totals['train']}, val {totals['val']})",
        f"rejected files: {totals['rejected_files']}",
        f"skipped classes: {totals['skipped_classes']}",
        f"ignored files without an image extension: {totals['ignored_files']}",
        "",
        "class_id\ttrain\tval\tclass_name",
    ]
    lines += [f"{c['class_id']}\t{c['train']}\t{c['val']}\t{name}" for name, c in info["classes"].items()]
    if info["skipped_classes"]:
        lines += ["", "Skipped classes:"] + [f"{_shown(s['class_name'])}: {s['reason']}"
                                             for s in info["skipped_classes"]]
    if info["rejected_files"]:
        lines += ["", "Rejected files:"] + [f"{r['path']}: {r['reason']}" for r in info["rejected_files"]]
    return "\n".join(lines) + "\n"


def _shown(name: str) -> str:
    """A class name for line-based listings: quoted with escapes when it holds control characters."""
    return repr(name) if control_characters(name) else name


def _move_into_place(staging: Path, output: Path) -> None:
    """Swap the staged dataset in: the old entries are moved into the staging dir (deleted with it)."""
    old = staging / "replaced"
    old.mkdir()
    for name in SPLITS + METADATA_FILES + (CACHE_FILE,):
        if os.path.lexists(output / name):
            os.rename(output / name, old / name)
        if os.path.lexists(staging / name):
            os.rename(staging / name, output / name)


def _print_summary(info: dict, output: Path) -> None:
    totals = info["totals"]
    print(f"\nPrepared {output}: {info['num_classes']} classes, {totals['images']} images "
          f"(train {totals['train']}, val {totals['val']}), {info['arguments']['link']} mode")
    if info["rejected_files"]:
        kinds = Counter(r["reason"].split(":")[0] for r in info["rejected_files"])
        print(f"Rejected {totals['rejected_files']} files (" + ", ".join(f"{n} {k}" for k, n in kinds.most_common())
              + "):")
        for r in info["rejected_files"][:PREVIEW]:
            print(f"  {r['path']}: {r['reason']}")
        if totals["rejected_files"] > PREVIEW:
            print("  ...")
    if info["skipped_classes"]:
        print(f"Skipped {totals['skipped_classes']} classes: " + ", ".join(
            f"{_shown(s['class_name'])} ({s['reason']})" for s in info["skipped_classes"][:PREVIEW])
              + (" ..." if totals["skipped_classes"] > PREVIEW else ""))
    if totals["ignored_files"]:
        print(f"Ignored {totals['ignored_files']} files without an image extension")
    if info["rejected_files"] or info["skipped_classes"]:
        print(f"Full lists: {output / 'dataset_info.json'} and {output / 'split_info.txt'}")
    print("\nNext, train with:\n  " + NEXT_COMMAND.format(data_path=shlex.quote(str(output))))
