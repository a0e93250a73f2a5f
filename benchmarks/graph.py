"""Time and size of building a model's graph: sonde.graph beside TensorBoard's JIT graph export.

Visuai's costly first step was ``torch.utils.tensorboard``'s JIT graph export (a ``torch.jit.trace``
of the model plus the conversion of the trace to a GraphDef): ResNet-18 1.39 s, ResNet-152
8.38 s, DenseNet-201 7.57 s on CIFAR-10 inputs in its README. Both are measured here, in one
process, on the same model and input, interleaved over rounds; the table prints the median of
each and their ratio. Goal: sonde ≤ 1/10 of the export's time on every model.

torchvision is not available here, so the vision models are compact re-definitions of the
torchvision architectures (same layers, same parameter counts); GPT-2 and BERT are built from
``transformers`` configs (random weights, no download).

Usage::

    python benchmarks/graph.py                 # all models, 3 rounds
    python benchmarks/graph.py --rounds 1 --models resnet18,gpt2
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sonde

# -- vision models (torchvision's architectures, compactly) ----------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))
                           if stride != 1 or cin != c else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, c * 4, 1, stride, bias=False), nn.BatchNorm2d(c * 4))
                           if stride != 1 or cin != c * 4 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, block: Any, layers: list[int], classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int) -> None:
        super().__init__({f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(n)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], growth: int = 32, init: int = 64, classes: int = 1000) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(3, init, 7, 2, 3, bias=False)), ("norm0", nn.BatchNorm2d(init)),
            ("relu0", nn.ReLU(inplace=True)), ("pool0", nn.MaxPool2d(3, 2, 1))]
        c = init
        for i, n in enumerate(blocks):
            layers.append((f"denseblock{i + 1}", DenseBlock(n, c, growth)))
            c += n * growth
            if i != len(blocks) - 1:
                layers.append((f"transition{i + 1}", nn.Sequential(
                    nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2))))
                c //= 2
        layers.append(("norm5", nn.BatchNorm2d(c)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [_conv_bn(cin, hidden, 1, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1)]
        features: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        c = 32
        for t, cout, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        features.append(_conv_bn(c, 1280, 1, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _transformer(kind: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers

    ids = torch.zeros(1, 128, dtype=torch.long)
    if kind == "gpt2":
        model: nn.Module = transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False))
    else:
        model = transformers.BertModel(transformers.BertConfig())
    return model.eval(), (ids,)


IMAGE = (torch.randn(1, 3, 32, 32),)  # CIFAR-10-sized, as Visuai's published numbers
MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "resnet18": lambda: (ResNet(BasicBlock, [2, 2, 2, 2]), IMAGE),
    "resnet50": lambda: (ResNet(Bottleneck, [3, 4, 6, 3]), IMAGE),
    "resnet152": lambda: (ResNet(Bottleneck, [3, 8, 36, 3]), IMAGE),
    "densenet121": lambda: (DenseNet((6, 12, 24, 16)), IMAGE),
    "densenet201": lambda: (DenseNet((6, 12, 48, 32)), IMAGE),
    "mobilenet_v2": lambda: (MobileNetV2(), IMAGE),
    "gpt2": lambda: _transformer("gpt2"),
    "bert": lambda: _transformer("bert"),
}


def tensorboard_export(model: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    """TensorBoard's graph export (what ``SummaryWriter.add_graph`` runs); returns the GraphDef's size."""
    from torch.utils.tensorboard._pytorch_graph import graph as tb_graph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph_def, _ = tb_graph(model, args, use_strict_trace=False)
    return graph_def.ByteSize()


def sonde_graph(model: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    """sonde.graph plus its JSON (what the probe stores with the run); returns the JSON's size."""
    return len(sonde.graph(model, args).to_json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    opts = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'model':<13} {'params':>7} {'nodes':>6} {'sonde':>9} {'json':>8} {'tensorboard':>12} {'graphdef':>9} "
          f"{'ratio':>7}")
    for name in opts.models.split(","):
        model, args = MODELS[name]()
        model.eval()  # batch of one: BatchNorm in training mode refuses it
        sonde_graph(model, args)  # warm-up both (imports, caches)
        tensorboard_export(model, args)
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(opts.rounds):
            start = time.perf_counter()
            size = sonde_graph(model, args)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            tb_size = tensorboard_export(model, args)
            theirs.append(time.perf_counter() - start)
        g = sonde.graph(model, args)
        a, b = statistics.median(ours), statistics.median(theirs)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<13} {params:>6.1f}M {len(g.nodes):>6} {a * 1e3:>7.0f}ms {size / 1024:>6.0f}kB "
              f"{b * 1e3:>10.0f}ms {tb_size / 1024:>7.0f}kB {a / b:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
