"""Split images with ``.txt`` label files into train / val annotation CSVs, dropping rare labels.

Example:
    python tools/split_multilabel_dataset.py --input-dir images/ --train-csv train.csv --val-csv val.csv \
        --val-ratio 0.2 --min-label-count 5 --recursive --relative-paths
"""

import argparse
from pathlib import Path

from data.multilabel import (
    collect_labeled_images,
    report_unusable_images,
    split_multilabel_rows,
    write_multilabel_csv,
)
from data.prepare import confirm_overwrite
from tools import add_labeled_images_args
from utils import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "split_multilabel_dataset.py", description="Random train/val split of images with .txt label files."
    )
    add_labeled_images_args(parser, replace="existing CSVs")
    parser.add_argument("--train-csv", required=True, help="training annotation CSV to write")
    parser.add_argument("--val-csv", required=True, help="validation annotation CSV to write")
    parser.add_argument("--val-ratio", type=float, default=0.2, help="share of the images for validation")
    parser.add_argument("--min-label-count", type=int, default=1,
                        help="drop labels seen fewer times over the whole set (rows left without labels are dropped)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    return parser


def no_labelled_images(input_dir: str, recursive: bool, unlabeled: int, invalid: int) -> str:
    """Why ``input_dir`` gave no labelled image, and what to do."""
    where = f"{input_dir}{' or its sub-folders' if recursive else ''}"
    if unlabeled or invalid:
        return (f"no image in {where} has a usable .txt label file ({unlabeled} without one, {invalid} unusable, "
                "listed above); put the labels beside each image (a.jpg + a.txt with 'artist_a,artist_b' or "
                "'(artist_a:0.7),(artist_b:0.3)')")
    return f"no image file in {where}" + ("" if recursive else "; add --recursive to look in sub-folders")


def main(args: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(args)
    if not 0 <= args.val_ratio < 1:
        raise UserError(f"--val-ratio must be in [0, 1), got {args.val_ratio}")
    if args.min_label_count < 1:
        raise UserError(f"--min-label-count must be at least 1, got {args.min_label_count}")
    train_csv, val_csv = Path(args.train_csv), Path(args.val_csv)
    if train_csv.resolve() == val_csv.resolve():
        raise UserError("--train-csv and --val-csv are the same file; give two different paths")
    existing = [str(p) for p in (train_csv, val_csv) if p.exists()]
    if existing:
        confirm_overwrite(f"{' and '.join(existing)} already exist.", args.yes)
    rows, unlabeled, invalid = collect_labeled_images(args.input_dir, args.recursive, args.relative_paths)
    report_unusable_images(unlabeled, invalid)
    if not rows:
        raise UserError(no_labelled_images(args.input_dir, args.recursive, len(unlabeled), len(invalid)))
    train, val, report = split_multilabel_rows(rows, args.val_ratio, args.min_label_count, args.seed)
    if not train:
        raise UserError(f"no image in {args.input_dir} is left with a label: every label of its {len(rows)} "
                        f"labelled images is seen fewer than {args.min_label_count} times; lower --min-label-count")
    write_multilabel_csv(train_csv, train)
    write_multilabel_csv(val_csv, val)

    dropped = report["dropped_labels"]
    if dropped:
        print(f"Dropped {len(dropped)} labels seen fewer than {args.min_label_count} times: {', '.join(dropped[:10])}"
              + (" ..." if len(dropped) > 10 else ""))
    if report["dropped_rows"]:
        print(f"Dropped {report['dropped_rows']} images left without any label")
    if report["val_only_labels"]:
        print(f"note: {len(report['val_only_labels'])} labels occur only in {val_csv} and will be ignored at "
              "validation: " + ", ".join(report["val_only_labels"][:10]))
    labels = {name for _, row_labels in train for name in row_labels}
    print(f"Wrote {train_csv} ({len(train)} images, {len(labels)} labels) and {val_csv} ({len(val)} images)")


if __name__ == "__main__":
    run_cli(main)
