"""Main job (placeholder until the Hydra app lands): build the dependency graph of the
embedded digits CNN, print its groups, prune half of one group and show that it still runs."""

from __future__ import annotations

import torch

from .graph import DependencyGraph
from .models import DigitsResNet


def main() -> None:
    """Print the pruning groups of the default model and prune one of them."""
    model = DigitsResNet().eval()
    x = torch.randn(1, 1, 8, 8)
    dg = DependencyGraph().build_dependency(model, x)
    groups = dg.get_all_groups()
    print(f"DigitsResNet: {len(dg.nodes)} graph nodes, {len(groups)} pruning groups")
    for g in groups:
        print(g.details())
    biggest = max(groups, key=len)
    half = biggest.root.idxs[: len(biggest.root.idxs) // 2]
    before = sum(p.numel() for p in model.parameters())
    biggest.prune(half)
    after = sum(p.numel() for p in model.parameters())
    print(f"pruned {len(half)} channels of {biggest.root.dep.target.name}: params {before} -> {after}, "
          f"output {tuple(model(x).shape)}")


if __name__ == "__main__":
    main()
