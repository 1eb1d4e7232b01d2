"""DDP test of the StructuredPruning callback: two CPU processes (gloo), ``strategy="ddp"``.

The test launches this file twice as a script, once per rank, with the environment variables of an
external launcher (``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE``...), which is how Lightning joins
processes it did not start. Each rank trains, prunes twice, and saves its final weights, optimizer
state and pruning records; the test then checks that both ranks hold exactly the same model.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_prune_identically(tmp_path: Path) -> None:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            NODE_RANK="0",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    a, b = results
    assert [r["epoch"] for r in a["records"]] == [None, 0, 1]
    assert a["records"] == b["records"]
    assert a["history"] == b["history"]
    assert a["epoch_starts"] == b["epoch_starts"]
    dense, after1, after2 = a["epoch_starts"][0], a["epoch_starts"][1], a["epoch_starts"][2]
    assert dense > after1 > after2, "two prunes must shrink the model twice"
    assert a["wrapped"] == [True, True, True], "training must run under a DDP wrapper after each prune"
    assert {k: v.shape for k, v in a["state_dict"].items()} == {
        k: v.shape for k, v in b["state_dict"].items()
    }
    # parameters must match exactly (BatchNorm running statistics are per rank under DDP)
    for k, v in a["params"].items():
        assert torch.equal(v, b["params"][k]), f"{k} differs between ranks"
    for k, v in a["momentum"].items():
        assert torch.equal(v, b["momentum"][k]), f"momentum of {k} differs between ranks"
    # both ranks saw different data: the identical weights come from DDP, not from identical inputs
    assert not torch.equal(a["first_batch"], b["first_batch"])


# ------------------------------------------------------------------------------------------ worker


def _worker(out_dir: str) -> None:
    import lightning.pytorch as pl
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, TensorDataset

    from prune_callbacks.integrations.lightning.callback import StructuredPruning

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(x)))
            return self.fc(torch.relu(self.conv2(x)).mean(dim=(2, 3)))

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Net()
            self.example_input_array = torch.zeros(1, 3, 8, 8)
            self.first_batch: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if self.first_batch is None:
                self.first_batch = x.clone()
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[int] = []
            self.wrapped: list[bool] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.starts.append(sum(p.numel() for p in pl_module.parameters()))
            model = trainer.strategy.model
            self.wrapped.append(isinstance(model, DistributedDataParallel) and model.module is pl_module)

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen))
    module = Lit()
    probe = Probe()
    cb = StructuredPruning("taylor", pruning_ratio=0.5, epochs=[0, 1], verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=1,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
        callbacks=[probe, cb],
    )
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=False))
    opt = trainer.optimizers[0]
    names = {p: n for n, p in module.named_parameters()}
    torch.save(
        {
            "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "params": {k: v.detach().clone() for k, v in module.named_parameters()},
            "momentum": {names[p]: s["momentum_buffer"].clone() for p, s in opt.state.items()},
            "records": cb.records,
            "history": cb.history,
            "epoch_starts": probe.starts,
            "wrapped": probe.wrapped,
            "first_batch": module.first_batch,
        },
        Path(out_dir) / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    _worker(sys.argv[1])
