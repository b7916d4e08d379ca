"""Worker for test_train_checkpoint: train a small model on N ranks, save, or resume from another N.

Every rank sees the same batches, so the averaged gradient does not depend on the number of ranks and
a run resumed on another world size must continue exactly like the original one.
    python reshard_worker.py OUT save|resume STEPS_BEFORE STEPS_AFTER [PRECISION]
"""
import json
import sys
from pathlib import Path

import torch

from chatterbox.config import StreamConfig, TrainConfig
from chatterbox.train.checkpoint import CheckpointManager
from chatterbox.train.distributed import init_distributed, shutdown_distributed
from chatterbox.train.engine import build_engine
from chatterbox.train.reshard import load_resharded


def main():
    out, mode, before, after = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    precision = sys.argv[5] if len(sys.argv) > 5 else "fp32"
    dist = init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.ReLU(), torch.nn.Linear(33, 3))
    cfg = TrainConfig(output_dir=str(out), epochs=1, steps_per_epoch=20, lr=1e-2, warmup_steps=1,
                      precision=precision, streams={"grounding": StreamConfig(4, 1, 1)})
    engine, _, _ = build_engine(model, cfg, dist.world_size)
    manager = CheckpointManager(out, keep_last=2, rank=dist.rank)

    def step(i):
        g = torch.Generator().manual_seed(i)
        loss = engine(torch.randn(4, 8, generator=g).to(next(model.parameters()).dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()

    if mode == "save":
        for i in range(before):
            step(i)
        manager.save(engine, before, {"step": before})
        start = before
    else:
        load_resharded(engine, manager.root, manager.latest(), dist.rank)
        start = before
    for i in range(start, before + after):
        step(i)
    if dist.rank == 0:
        params = [p.detach().float().flatten().tolist() for p in model.parameters()]
        (out / f"params_{mode}.json").write_text(json.dumps(params))
    # A gloo rank that exits with its process group still alive can abort ("terminate called without an
    # active exception") while the other rank still talks to it.
    shutdown_distributed()


if __name__ == "__main__":
    main()
