"""Random CNN generator for property tests: convs (plain, grouped, depthwise), BN, ReLU,
residual adds, concats (also concat of concats), splits (also split then concat), flatten into
linear layers. Also the "masked" reference: the original model with given channels zeroed."""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import strategies as st


class SplitSizes(nn.Module):
    """Channel split whose sizes live in an attribute (the graph keeps it up to date)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, self.sizes, dim=1)


class RandNet(nn.Module):
    """Interprets a small program over a list of feature maps."""

    def __init__(self, program: list[tuple], layers: nn.ModuleDict) -> None:
        super().__init__()
        self.program = program
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for op, *args in self.program:
            if op == "layer":
                src, name = args
                feats.append(self.layers[name](feats[src]))
            elif op == "add":
                a, b = args
                feats.append(feats[a] + feats[b])
            elif op == "cat":
                feats.append(torch.cat([feats[i] for i in args[0]], dim=1))
            elif op == "split":
                src, name = args
                feats.extend(self.layers[name](feats[src]))
            elif op == "relu":
                feats.append(torch.relu(feats[args[0]]))
        return feats[-1]


@st.composite
def random_cnn(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """A random CNN (eval mode) and an input batch."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    in_ch, hw = 3, draw(st.sampled_from([4, 6]))
    chans = [in_ch]
    layers = nn.ModuleDict()
    program: list[tuple] = []
    counter = [0]

    def new_name() -> str:
        counter[0] += 1
        return f"l{counter[0]}"

    def conv(src: int, out: int | None = None) -> int:
        c = chans[src]
        kind = draw(st.sampled_from(["plain", "plain", "grouped", "depthwise"]))
        forced = out
        if out is None:
            out = draw(st.integers(2, 8))
        mod: nn.Conv2d | None = None
        if kind == "depthwise" and c >= 2:
            mult = draw(st.sampled_from([1, 2]))
            if forced is None or forced == c * mult:
                mod = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
            elif forced == c:
                mod = nn.Conv2d(c, c, 3, padding=1, groups=c)
        elif kind == "grouped" and c % 2 == 0 and out % 2 == 0 and c >= 4:
            mod = nn.Conv2d(c, out, 3, padding=1, groups=2)
        if mod is None:
            mod = nn.Conv2d(c, out, draw(st.sampled_from([1, 3])), padding="same", bias=draw(st.booleans()))
        seq = [mod]
        if draw(st.booleans()):
            bn = nn.BatchNorm2d(mod.out_channels)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
            seq.append(bn)
        seq.append(nn.ReLU())
        name = new_name()
        layers[name] = nn.Sequential(*seq)
        program.append(("layer", src, name))
        chans.append(mod.out_channels)
        return len(chans) - 1

    cur = conv(0)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["conv", "residual", "concat", "split", "split_cat", "cat_cat"]))
        if op == "conv":
            cur = conv(cur)
        elif op == "residual":
            branch = conv(cur, out=chans[cur])
            program.append(("add", cur, branch))
            chans.append(chans[cur])
            cur = len(chans) - 1
        elif op in ("concat", "cat_cat"):
            other = conv(cur)
            program.append(("cat", [cur, other]))
            chans.append(chans[cur] + chans[other])
            cur = len(chans) - 1
            if op == "cat_cat":
                third = conv(other)
                program.append(("cat", [cur, third]))
                chans.append(chans[cur] + chans[third])
                cur = len(chans) - 1
        elif op in ("split", "split_cat") and chans[cur] >= 4:
            a = draw(st.integers(2, chans[cur] - 2))
            name = new_name()
            layers[name] = SplitSizes([a, chans[cur] - a])
            program.append(("split", cur, name))
            chans.extend([a, chans[cur] - a])
            first, second = len(chans) - 2, len(chans) - 1
            left = conv(first)
            if op == "split_cat":
                program.append(("cat", [second, left]))
                chans.append(chans[second] + chans[left])
            else:
                right = conv(second, out=chans[left])
                program.append(("add", left, right))
                chans.append(chans[left])
            cur = len(chans) - 1
    head_name = new_name()
    hidden = draw(st.integers(3, 10))
    layers[head_name] = nn.Sequential(nn.Flatten(), nn.Linear(chans[cur] * hw * hw, hidden), nn.ReLU())
    program.append(("layer", cur, head_name))
    out_name = new_name()
    layers[out_name] = nn.Linear(hidden, 5)
    chans.append(hidden)
    program.append(("layer", len(chans) - 1, out_name))
    chans.append(5)
    model = RandNet(program, layers).eval()
    x = torch.randn(2, in_ch, hw, hw)
    return model, x


@torch.no_grad()
def zero_channels(module: nn.Module, side: str, idxs: list[int]) -> None:
    """Zero what channels ``idxs`` of ``module`` contribute (the masked reference of a prune)."""
    if not idxs:
        return
    ix = torch.tensor(idxs)
    if isinstance(module, nn.Conv2d):
        g = module.groups
        if side == "out" or (g > 1 and g == module.in_channels):
            if g > 1 and g == module.in_channels and side == "in":
                mult = module.out_channels // module.in_channels
                ix = torch.tensor([i * mult + j for i in idxs for j in range(mult)])
            module.weight[ix] = 0
            if module.bias is not None:
                module.bias[ix] = 0
        else:
            per_in = module.in_channels // g
            per_out = module.out_channels // g
            for i in idxs:
                grp = i // per_in
                module.weight[grp * per_out : (grp + 1) * per_out, i % per_in] = 0
    elif isinstance(module, nn.BatchNorm2d):
        module.weight[ix] = 0
        module.bias[ix] = 0
    elif isinstance(module, nn.Linear):
        if side == "out":
            module.weight[ix] = 0
            module.bias[ix] = 0
        else:
            module.weight[:, ix] = 0
    else:
        raise TypeError(type(module))
