"""The first batches of a Trainer's training set, for work done once at train start (SAT's ``layer_rates: auto``
calibration, LTE's ``router_init: activations`` fit)."""

from __future__ import annotations

import torch
from torch import nn


def first_batches(dataloader, count: int, args, model: nn.Module) -> list[dict]:
    """The first ``count`` batches of the training set in dataset order, collated as the Trainer does,
    on the model's device (fewer, or none, when the set is smaller); reading the dataset (not iterating the
    loader) leaves its sampler untouched."""
    dataset, collate = dataloader.dataset, dataloader.collate_fn
    size = dataloader.batch_size or args.per_device_train_batch_size
    device = next(model.parameters()).device
    batches = []
    for b in range(count):  # the Trainer built the loader on its dataset with the unused columns removed
        examples = [dataset[i] for i in range(b * size, min((b + 1) * size, len(dataset)))]
        if not examples:
            break
        batch = collate(examples)
        batches.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
    return batches
