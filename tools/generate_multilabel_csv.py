"""Build a multi-label annotation CSV from images with same-named ``.txt`` label files (``a.jpg`` + ``a.txt``).

Example:
    python tools/generate_multilabel_csv.py --input-dir images/ --output-csv labels.csv --recursive --relative-paths
"""

import argparse
from pathlib import Path

from data.multilabel import collect_labeled_images, report_unusable_images, write_multilabel_csv
from data.prepare import confirm_overwrite
from tools import add_labeled_images_args
from utils import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "generate_multilabel_csv.py", description="Write image_path,labels rows for images that have a .txt label file."
    )
    add_labeled_images_args(parser, replace="an existing --output-csv")
    parser.add_argument("--output-csv", required=True, help="annotation CSV to write")
    return parser


def main(args: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(args)
    output = Path(args.output_csv)
    if output.exists():
        confirm_overwrite(f"{output} already exists.", args.yes)
    rows, unlabeled, invalid = collect_labeled_images(args.input_dir, args.recursive, args.relative_paths)
    report_unusable_images(unlabeled, invalid)
    if not rows:
        raise UserError(f"no image in {args.input_dir} has a usable .txt label file"
                        + ("" if args.recursive else " (add --recursive to include sub-folders)"))
    write_multilabel_csv(output, rows)
    labels = {name for _, row_labels in rows for name in row_labels}
    print(f"Wrote {output}: {len(rows)} images, {len(labels)} labels")


if __name__ == "__main__":
    run_cli(main)
