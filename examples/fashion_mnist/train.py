"""Train the Fashion-MNIST example models and export them to ONNX.

Model ``plain``: a CIFAR-style ResNet (stem conv, 3 stages x 3 basic residual blocks of widths 8/16/32,
global average pool + linear) exported as ``resnet_plain.onnx`` with one output ``logits``.
Model ``exits``: the same backbone with DistrEE-style exit heads, trained jointly (cross-entropy on every
exit and the final classifier, plus knowledge distillation from the final classifier to each exit),
exported as ``resnet_exits.onnx`` with outputs ``logits, exit_1, exit_2, ...`` (extra graph outputs named
``exit_*`` are exits, ordered by depth). The shipped model is trained from scratch; ``--init`` can start
it from model ``plain``'s checkpoint instead (``train.py`` writes ``<model>.pt`` beside the ONNX).

Results (ONNX Runtime accuracy on the full test set, wall time, command, machine) go to ``models.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import data  # noqa: E402
from evaluate import EXIT_PREFIX, FINAL_OUTPUT, onnx_accuracies  # noqa: E402
from distree.serde import read_json, write_bytes_atomic, write_json_atomic  # noqa: E402

BLOCKS_PER_STAGE = 3
OPSET = 17
MODELS = {
    "plain": {"file": "resnet_plain.onnx", "exit_after": ()},
    # residual block indices (1-based, of 9) whose output feeds an exit head: end of stage 1, end of
    # stage 2, and one block before the end of stage 3
    "exits": {"file": "resnet_exits.onnx", "exit_after": (3, 6, 8)},
}


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN, identity (or 1x1 conv+BN projection) shortcut, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = (nn.Identity() if stride == 1 and in_ch == out_ch else
                         nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ExitHead(nn.Module):
    """1x1 conv to ``head_ch`` channels + BN + ReLU, global average pool, linear: cheap, but wider than
    the narrow early feature maps so an early exit has enough capacity."""

    def __init__(self, in_ch: int, head_ch: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, head_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(head_ch)
        self.fc = nn.Linear(head_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class ResNet(nn.Module):
    """Stem conv at 28x28, 3 stages x ``blocks_per_stage`` BasicBlocks (3: the examples; 18: a ResNet-110),
    each stage starting with stride 2 (14x14, 7x7, 4x4 maps: a quarter of the compute of a 28x28 first stage,
    which the shared 2-core training machine needs), global average pool + linear.
    ``forward`` returns (logits, exit_1, exit_2, ...), the exits in depth order."""

    def __init__(self, widths: tuple[int, int, int], exit_after: tuple[int, ...] = (), num_classes: int = 10,
                 blocks_per_stage: int = BLOCKS_PER_STAGE):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, in_ch = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_ch, width, 2 if i == 0 else 1))
                in_ch = width
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        self.exit_after = tuple(exit_after)
        head_ch = widths[-1]
        self.exits = nn.ModuleList(ExitHead(blocks[k - 1].conv2.out_channels, head_ch, num_classes)
                                   for k in self.exit_after)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        exit_logits = []
        for index, block in enumerate(self.blocks, start=1):
            x = block(x)
            if index in self.exit_after:
                exit_logits.append(self.exits[self.exit_after.index(index)](x))
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return (logits, *exit_logits)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding (in normalized units: pad with the background value) + horizontal flip."""
    n, _, h, w = x.shape
    background = float(x.min())
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def joint_loss(outputs: tuple[torch.Tensor, ...], y: torch.Tensor, temperature: float, kd_weight: float) -> torch.Tensor:
    """CE on the final classifier and every exit, plus KL(final || exit) at ``temperature`` for each exit."""
    final, *exits = outputs
    loss = F.cross_entropy(final, y)
    teacher = F.log_softmax(final.detach() / temperature, dim=1)
    for logits in exits:
        student = F.log_softmax(logits / temperature, dim=1)
        kd = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2
        loss = loss + F.cross_entropy(logits, y) + kd_weight * kd
    return loss


def train(model: ResNet, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = (len(x) + args.batch_size - 1) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                   steps_per_epoch=steps_per_epoch)
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        start, total_loss, correct = time.time(), 0.0, 0
        order = torch.randperm(len(x), generator=generator)
        for first in range(0, len(x), args.batch_size):
            batch = order[first:first + args.batch_size]
            xb, yb = augment(x[batch], generator), y[batch]
            outputs = model(xb)
            loss = joint_loss(outputs, yb, args.kd_temperature, args.kd_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
            correct += int((outputs[0].argmax(1) == yb).sum())
            if (first // args.batch_size + 1) % 100 == 0:
                print(f"  epoch {epoch} batch {first // args.batch_size + 1}/{steps_per_epoch} "
                      f"{time.time() - start:.0f}s", flush=True)
        record = {"epoch": epoch, "loss": round(total_loss / len(x), 4), "train_acc": round(correct / len(x), 4),
                  "seconds": round(time.time() - start, 1)}
        history.append(record)
        print(json.dumps(record), flush=True)
    return history


def export_onnx(model: ResNet, out_path: Path, check_x: np.ndarray) -> None:
    """Legacy (TorchScript) exporter, opset 17, dynamic batch; checked with onnx.checker and against torch."""
    model.eval()
    names = [FINAL_OUTPUT] + [f"{EXIT_PREFIX}{k}" for k in range(1, len(model.exit_after) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / out_path.name
        torch.onnx.export(model, (torch.from_numpy(check_x[:1]),), str(tmp_path), dynamo=False,
                          opset_version=OPSET, input_names=["input"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["input", *names]}, do_constant_folding=True)
        proto = onnx.load(str(tmp_path))
    onnx.checker.check_model(proto, full_check=True)
    serialized = proto.SerializeToString()
    session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    ort_outputs = session.run(names, {"input": check_x})
    with torch.no_grad():
        torch_outputs = model(torch.from_numpy(check_x))
    for name, ort_out, torch_out in zip(names, ort_outputs, torch_outputs):
        diff = float(np.abs(ort_out - torch_out.numpy()).max())
        print(f"ort vs torch {name}: max abs diff {diff:.2e}", flush=True)
        if diff > 1e-3:
            raise RuntimeError(f"ONNX export of {name} disagrees with torch by {diff}")
    write_bytes_atomic(out_path, serialized)


def machine_description() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, shared with other jobs (load avg at end {os.getloadavg()[0]:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--widths", type=int, nargs=3, default=(8, 16, 32))
    parser.add_argument("--blocks-per-stage", type=int, default=BLOCKS_PER_STAGE,
                        help="residual blocks per stage (18: a ResNet-110, benchmarks/resnet110_example.sh)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--kd-temperature", type=float, default=3.0)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--init", type=Path, help="checkpoint (.pt) whose matching weights start the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    began = time.time()

    train_raw, test_raw = data.load_split("train"), data.load_split("t10k")
    fit_index, _ = data.train_calib_split(len(train_raw.labels))
    mean, std = data.normalization(train_raw.images[fit_index])
    x_fit = torch.from_numpy(data.to_input(train_raw.images[fit_index], mean, std))
    y_fit = torch.from_numpy(train_raw.labels[fit_index])
    x_test, y_test = data.to_input(test_raw.images, mean, std), test_raw.labels

    spec = MODELS[args.model]
    model = ResNet(tuple(args.widths), spec["exit_after"], blocks_per_stage=args.blocks_per_stage)
    if args.init:
        missing, unexpected = model.load_state_dict(torch.load(args.init, weights_only=True), strict=False)
        if unexpected or any(not key.startswith("exits.") for key in missing):
            raise SystemExit(f"{args.init} does not match this architecture: missing {missing}, unexpected {unexpected}")
        print(f"initialized from {args.init}; new parameters: {missing}", flush=True)

    history = train(model, x_fit, y_fit, args)
    train_seconds = time.time() - began

    onnx_path = args.out_dir / spec["file"]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes_atomic(onnx_path.with_suffix(".pt"), buffer.getvalue())
    export_onnx(model, onnx_path, x_test[:256])
    accuracies = onnx_accuracies(onnx_path, x_test, y_test)
    print(f"ONNX Runtime test accuracy: {accuracies}", flush=True)

    models_json = args.out_dir / "models.json"
    doc = read_json(models_json) if models_json.exists() else {"schema_version": 1, "models": {}}
    doc["models"][args.model] = {
        "file": spec["file"],
        "command": shlex.join([".venv/bin/python", "examples/fashion_mnist/train.py", *sys.argv[1:]]),
        "architecture": {"widths": list(args.widths), "blocks_per_stage": args.blocks_per_stage,
                         "exit_after_blocks": list(spec["exit_after"])},
        "outputs": list(accuracies),
        "epochs": args.epochs,
        "initialized_from": str(args.init) if args.init else None,
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(time.time() - began, 1),
        "test_accuracy": {name: round(acc, 4) for name, acc in accuracies.items()},
        "test_samples": int(len(y_test)),
        "normalization": {"mean": mean, "std": std},
        "history": history,
        "machine": machine_description(),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    write_json_atomic(models_json, doc)


if __name__ == "__main__":
    main()
