"""Sharded freezing under FSDP2 `fully_shard` on CPU (gloo), launched by tests with torchrun, 2 processes.

Writes OUT.<rank> with {"frozen_identical": bool, "moved": int, "local_rows": [...]}.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from dpi_hf import CoreMask, ParameterFreezer


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 7), torch.nn.ReLU(),
                                torch.nn.Linear(7, 5))  # 7 rows: uneven shards; 5x7 weight of the last layer too
    full0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    frozen = CoreMask.from_dense({n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()})
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    freezer = ParameterFreezer(model, frozen).attach(opt)
    for step in range(12):
        torch.manual_seed(100 + step * 2 + rank)
        x = torch.randn(8, 16)
        loss = model(x).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    freezer.detach()
    identical, moved, rows = True, 0, []
    for n, p in model.named_parameters():
        full = p.full_tensor().detach()
        idx = frozen.indices(n)
        same = torch.equal(full.reshape(-1)[idx].view(torch.int32), full0[n].reshape(-1)[idx].view(torch.int32))
        identical &= same
        free = ~frozen.dense(n)
        moved += int((full[free] != full0[n][free]).sum())
        rows.append(list(p.to_local().shape))
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"frozen_identical": identical, "moved": moved, "local_rows": rows}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
