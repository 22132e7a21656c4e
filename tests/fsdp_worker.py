"""FSDP2 (fully_shard per decoder layer, 2 CPU ranks, gloo) with SAT applied before sharding.

Usage: python -m torch.distributed.run --nproc_per_node 2 fsdp_worker.py OUT METRIC
Both ranks feed the same batch; rank 0 saves the loss, kept sets and the full gradients.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from tiny import batch, build, leave_process_group, sat_config  # noqa: E402

from sat_trainer import apply_sat  # noqa: E402


def main():
    out, metric = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    model = build("llama")
    handle = apply_sat(model, sat_config(omission_rate=0.5, metric=metric))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    if dist.get_rank() == 0:
        torch.save({"loss": loss.detach(), "grads": grads, "kept": handle.kept()}, out / "fsdp.pt")
    leave_process_group()


if __name__ == "__main__":
    main()
