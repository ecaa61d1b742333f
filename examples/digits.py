"""Quantize a small CNN on real images: scikit-learn's bundled digits (8x8 handwritten digits, no download).

Train a float CNN (Conv2d + Linear), quantize it W8A8 (int8 weights and static int8 activations),
calibrate, compare accuracy, fine-tune a few epochs with quantization-aware training, freeze, save one
safetensors file, reload it into a fresh float skeleton, and check the reloaded accuracy is identical.

    python examples/digits.py
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import quanto_fx
from quanto_fx import QTensor, calibration, freeze, quantize


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 4 * 4, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def load_data(seed: int = 0):
    """The 1797 digits, pixel values scaled to [0, 1], split 80/20 with a fixed seed."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return (images[train], labels[train]), (images[test], labels[test])


def logits_of(output: torch.Tensor) -> torch.Tensor:
    return output.dequantize() if isinstance(output, QTensor) else output


@torch.no_grad()
def accuracy(model: torch.nn.Module, data) -> float:
    images, labels = data
    model.eval()
    predictions = logits_of(model(images)).argmax(dim=1)
    return 100.0 * (predictions == labels).float().mean().item()


def train(model: torch.nn.Module, data, epochs: int, lr: float, seed: int = 0) -> None:
    images, labels = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            loss = F.cross_entropy(logits_of(model(images[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def run(float_epochs: int = 8, qat_epochs: int = 2, verbose: bool = True) -> dict[str, float]:
    """The whole workflow; returns accuracies (percent) and checkpoint sizes (bytes)."""
    torch.manual_seed(0)
    train_data, test_data = load_data()
    say = print if verbose else (lambda *a: None)

    model = make_model()
    train(model, train_data, float_epochs, lr=1e-3)
    results = {"float": accuracy(model, test_data)}
    say(f"float accuracy                  {results['float']:6.2f}%")

    qmodel = quantize(model, weights=quanto_fx.qint8, activations=quanto_fx.qint8, inplace=False)
    with torch.no_grad(), calibration(momentum=0.9):
        for batch in train_data[0].split(256):
            qmodel(batch)
    results["calibrated"] = accuracy(qmodel, test_data)
    say(f"W8A8 after calibration          {results['calibrated']:6.2f}%")

    train(qmodel, train_data, qat_epochs, lr=1e-4, seed=1)
    with torch.no_grad(), calibration(momentum=0.9):  # re-fit activation ranges to the tuned weights
        for batch in train_data[0].split(256):
            qmodel(batch)
    results["qat"] = accuracy(qmodel, test_data)
    say(f"W8A8 after QAT ({qat_epochs} epochs)        {results['qat']:6.2f}%")

    freeze(qmodel)
    results["frozen"] = accuracy(qmodel, test_data)
    with tempfile.TemporaryDirectory() as tmp:
        float_path, quant_path = os.path.join(tmp, "float.pt"), os.path.join(tmp, "w8a8.safetensors")
        torch.save(model.state_dict(), float_path)
        quanto_fx.save(qmodel, quant_path)
        results["float_bytes"] = os.path.getsize(float_path)
        results["quantized_bytes"] = os.path.getsize(quant_path)
        reloaded = quanto_fx.load(quant_path, make_model())
    results["reloaded"] = accuracy(reloaded, test_data)
    say(f"frozen {results['frozen']:.2f}%, reloaded {results['reloaded']:.2f}%")
    ratio = results["quantized_bytes"] / results["float_bytes"]
    say(f"checkpoint: float {results['float_bytes']} B, W8A8 {results['quantized_bytes']} B ({ratio:.2f}x)")
    return results


if __name__ == "__main__":
    run()
