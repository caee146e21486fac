"""One process of tests/test_metric_learning.py's two-process SupCon check (a small module: spawned processes
import it, not the test module with its training helpers)."""

import torch

from losses import SupConLoss


def run_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One process of the gathered-SupCon check: its rows of the shared batch, its loss and their gradient."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        features, targets = batch()
        rows = slice(0, 5) if rank == 0 else slice(5, None)  # unequal shares: the gather pads and trims
        local = features[rows].clone().requires_grad_(True)
        loss = SupConLoss(temperature=0.2)(local, targets[rows])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The shared batch: 8 vectors of 4 classes."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=generator), torch.tensor([0, 0, 1, 2, 3, 1, 3, 2])

