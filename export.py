#!/usr/bin/env python3
"""Export an artist model for deployment: ONNX (standard operators, verified with onnxruntime) and/or safetensors.

Accepts what inference accepts (a training run's model folder, an original-fork or official checkpoint, a community
model folder, an ``hf-hub:OWNER/REPO`` id) and writes a self-contained folder that ``inference_artist.py``,
``predict_artist_multilabel.py`` and ``predictor.load_model_bundle`` run; see docs/deployment.md.
"""

import argparse
from pathlib import Path

from artifacts.model_folder import read_model_spec
from deploy.exporter import FORMATS, ExportOptions, export_model
from utils import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="model folder, checkpoint file or hf-hub:OWNER/REPO[@revision]")
    parser.add_argument("--model", default=None,
                        help="architecture (default: recorded in config.json or the checkpoint)")
    parser.add_argument("--class-csv", default=None, help="class_mapping.csv (default: the model folder's)")
    parser.add_argument("--output-dir", required=True, help="folder to write (created if needed)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="input size in pixels (default: the training size, else the model's)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="dynamic input height and width (default: fixed at --input-size; the batch is always "
                             "dynamic)")
    parser.add_argument("--format", dest="file_format", choices=FORMATS, default="onnx",
                        help="onnx (model.onnx), safetensors (model.safetensors) or both (default: onnx)")
    parser.add_argument("--int8", action="store_true",
                        help="also write int8/ (onnxruntime static QDQ quantization) and print its speed-up and "
                             "top-1 agreement")
    parser.add_argument("--calibration-dir", type=Path, default=None, help="typical images to calibrate --int8 with")
    return parser


def main(args: argparse.Namespace | None = None) -> Path:
    args = args if args is not None else get_args_parser().parse_args()
    if args.int8 and args.file_format == "safetensors":
        raise UserError("--int8 quantizes the ONNX model; use --format onnx or both")
    if args.int8 and args.calibration_dir is None:
        raise UserError("--int8 needs --calibration-dir with a few dozen typical images")
    spec = read_model_spec(args.checkpoint, args.class_csv, model_name=args.model)
    options = ExportOptions(Path(args.output_dir), args.input_size, args.opset, args.dynamic_size, args.file_format,
                            args.int8, args.calibration_dir)
    folder = export_model(spec, options)
    print(f"done: {folder} (run it: python inference_artist.py --checkpoint {folder} --input IMAGES)")
    return folder


if __name__ == "__main__":
    run_cli(main)
