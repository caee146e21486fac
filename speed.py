"""Measure inference or training throughput (images/s) and peak memory of LSNet and other timm models.

    python speed.py --model lsnet_t_artist --batch-size 32
    python speed.py --compare lsnet_t_artist,lsnet_t_artist:naive --batch-size 32
    python speed.py --train --compare lsnet_t_artist,efficientvit_m3 --batch-size 16
    python speed.py --model lsnet_t --device cuda --dtype float16 --channels-last --batch-size 2048
    python speed.py --train --amp --dtype float16 --model lsnet_t --device cuda --batch-size 256

An entry is a timm model name with an optional variant tag, ``name:tag``:

* ``fused`` (default): inference on the BatchNorm-fused model (``timm.utils.reparameterize_model``), SKA auto;
* ``compiled``: fused, then ``utils.compile_for_inference`` (torch.compile with Inductor freezing), as
  ``inference_artist.py --compile`` runs it; compiling happens in the warm-up (use ``--warmup`` 1 or more);
* ``unfused``: the model as trained, SKA picked automatically;
* ``naive``: unfused, every SKA replaced by the naive unfold reference (how the original code ran on a CPU);
* ``torch`` / ``triton``: fused, with that SKA implementation forced.

Training ignores fusion and the ``compiled`` tag (the model is in train mode; ``--compile`` compiles every entry)
but honours the SKA implementation of the tag.
The timed repeats of the compared entries are interleaved (A B A B ...), so drift in machine load hits them alike;
each repeat times ``--iters`` steps. The table gives the median, min and max images/s over the repeats and the
ratio of each entry's median to the first entry's.

Peak memory is the memory held by tensors at the worst moment of one step: the entry's own state (weights, buffers,
gradients, optimizer state, input batch) plus the most allocated at once during the step; the latter comes from
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, from replaying the allocation and free events that
``torch.profiler`` records (exact for tensor storage, unlike resident-set size, which depends on the allocator).

The measuring code lives in the ``perf`` package (``perf.workloads`` defines these flags); this script prints its
table.
"""

import argparse

from perf.benchmark import Result, benchmark, format_table
from perf.probes import memory_method
from perf.workloads import SpeedSettings, add_speed_args, describe_run, setup
from utils import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "speed", description="Images/s and peak memory of models, inference or training.", add_help=True
    )
    return add_speed_args(parser)


def main(args: argparse.Namespace | None = None) -> list[Result]:
    """Run the benchmark described by ``args`` (parsed from the command line when None) and print the table."""
    settings = SpeedSettings.from_args(args if args is not None else get_args_parser().parse_args())
    device, workloads = setup(settings)
    print(describe_run(settings, device))
    results = benchmark(workloads, device, settings.repeats, settings.warmup)
    print(format_table(results))
    if settings.memory:
        print(memory_method(device))
    return results


if __name__ == "__main__":
    run_cli(main)
