"""Distributed data parallel: `torchrun --nproc_per_node=N train.py ...` runs train.py N times. Every rank holds all
data and the same model; each step splits the batch across ranks, DDP averages the gradients, and rank 0 alone
writes files and prints. A plain `python train.py` is rank 0 of 1, and none of this runs."""
import os
import sys

import torch
import torch.distributed as dist


def init_distributed(device: str):
    """(rank, world size, device); a plain `python train.py` (no torchrun environment) is rank 0 of 1."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])   # one GPU per process
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but torch sees {torch.cuda.device_count()} CUDA device(s)")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if rank:
        sys.stdout = open(os.devnull, "w")  # silences print and tqdm.write
    return rank, world, device


def shard(rows, examples, rank, world):
    """This rank's rows of a batch and the weight of their mean loss. DDP averages gradients over ranks,
    so weighting by world * (the rank's supervised tokens) / (the batch's) makes the step the same as one
    process taking the whole batch. A rank left without rows (short last batch) takes one at weight 0."""
    if world == 1:
        return rows, 1.0
    if len(rows) <= rank:
        return rows[:1], 0.0
    supervised = [sum(examples[i][1][1:]) for i in rows]   # loss_mask[1:]: the tokens the loss averages
    return rows[rank::world], world * sum(supervised[rank::world]) / sum(supervised)


def batch_loss(loss, weight: float, world: int):
    """The whole batch's mean loss from this rank's (its weight: shard's), as one process would log it."""
    if world == 1:
        return loss
    loss = (loss * weight).detach()
    dist.all_reduce(loss)
    return loss / world
