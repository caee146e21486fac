"""Deployment speed on the CPU: onnxruntime fp32 vs PyTorch eager (fused) vs compiled, batch 1 and 32, and int8.

    python bench/bench_deploy.py                        # lsnet_t_artist at 224, ~5 minutes on a busy 2-core CPU
    python bench/bench_deploy.py --no-compile --repeats 3

Every figure is images/s, median of interleaved repeats in one run on the same inputs (``perf.benchmark``); ratios
are to PyTorch eager fused at the same batch size. int8 is onnxruntime static QDQ per-channel quantization
(``export.py --int8``) calibrated on the deterministic probe images, with its top-1 agreement with fp32 on them. The
model is randomly initialised (weights do not change the speed; the agreement of a trained model is what
``export.py --int8`` prints on your calibration images).
"""

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch

from data.resize import IMAGENET_MEAN, IMAGENET_STD
from deploy.export_onnx import INPUT_NAME, export_onnx, export_ready, probe_inputs
from deploy.quantize import compare_int8, quantize_int8
from perf.benchmark import Workload, benchmark
from utils import compile_for_inference, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lsnet_t_artist")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile")
    return parser


def workloads(net: torch.nn.Module, session: onnxruntime.InferenceSession, int8: onnxruntime.InferenceSession,
              batch: np.ndarray, compile: bool) -> list[Workload]:
    x = torch.from_numpy(batch)
    n = len(batch)
    compiled = compile_for_inference(copy.deepcopy(net)) if compile else None  # its own weights (freezing)

    def eager() -> None:
        with torch.inference_mode():
            net(x)

    def compiled_run() -> None:
        with torch.inference_mode():
            compiled(x)

    items = [Workload(f"PyTorch eager fused, batch {n}", eager, n, memory=False),
             Workload(f"onnxruntime fp32, batch {n}", lambda: session.run(None, {INPUT_NAME: batch}), n, memory=False),
             Workload(f"onnxruntime int8, batch {n}", lambda: int8.run(None, {INPUT_NAME: batch}), n, memory=False)]
    if compiled is not None:
        items.insert(1, Workload(f"PyTorch compiled, batch {n}", compiled_run, n, memory=False))
    return items


def main(args: argparse.Namespace | None = None) -> None:
    args = args if args is not None else get_args_parser().parse_args()
    torch.manual_seed(0)
    net = timm.create_model(args.model, num_classes=args.num_classes).eval()
    wrapper = export_ready(net)
    net.fuse()
    size = args.input_size
    calibration = probe_inputs(32, size, list(IMAGENET_MEAN), list(IMAGENET_STD))
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        export_onnx(wrapper, fp32_path, size, 18, dynamic_size=False)
        quantize_int8(fp32_path, int8_path, calibration, INPUT_NAME)
        session = onnxruntime.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        int8 = onnxruntime.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
        print("| workload | images/s (median) | vs eager fused |\n| --- | ---: | ---: |")
        for batch_size in args.batch_sizes:
            batch = np.ascontiguousarray(np.resize(calibration, (batch_size, 3, size, size)))
            results = benchmark(workloads(net, session, int8, batch, args.compile), torch.device("cpu"),
                                repeats=args.repeats, warmup=2)
            base = statistics.median(results[0].images_per_s)
            for result in results:
                speed = statistics.median(result.images_per_s)
                print(f"| {result.label} | {speed:.1f} | {speed / base:.2f}x |")
        print(f"\n{compare_int8(session, int8, INPUT_NAME, calibration).line()}")
    print(f"\n{args.model} at {size} px, {args.num_classes} classes, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    run_cli(main)
