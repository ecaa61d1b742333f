"""Accuracy of weight formats on a real pretrained model: all-MiniLM-L6-v2 (examples/demo.py), every Linear
quantized weight-only to int8 / int4 / int2 / float8 (and float8 weights + activations), with int4 and int2
groups both symmetric and shifted (min-max with a float zero). It is the measurement behind
``quanto_fx.nn.qmodule.SHIFTED_GROUPS``.

    .venv/bin/python bench/lowbit_accuracy.py [--sentences 256] [--group-size 128]

Accuracy: cosine similarity of the sentence embeddings to float32 (mean and worst), and nearest-neighbour
agreement (% of sentences whose nearest other sentence is unchanged). Size: the safetensors checkpoint
against float32's (embeddings stay float32: Linear layers only are quantized).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import demo  # noqa: E402
from stdlib_text import load_sentences  # noqa: E402

import quanto_fx.nn.qmodule as qmodule  # noqa: E402
from quanto_fx import freeze, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, quantize  # noqa: E402

CONFIGS = {
    "int8 (per channel)": dict(weights=qint8),
    "float8 e4m3fn": dict(weights=qfloat8_e4m3fn),
    "float8 e5m2": dict(weights=qfloat8_e5m2),
    "float8 e4m3fn W + A (dynamic)": dict(weights=qfloat8_e4m3fn, activations=qfloat8_e4m3fn),
    "int4 symmetric": dict(weights=qint4, shift=False),
    "int4 shifted": dict(weights=qint4, shift=True),
    "int2 symmetric": dict(weights=qint2, shift=False),
    "int2 shifted": dict(weights=qint2, shift=True),
}


@contextlib.contextmanager
def shifted(wqtype, shift):
    """Quantize ``wqtype`` groups with or without the shift while the block runs."""
    saved = dict(qmodule.SHIFTED_GROUPS)
    if shift is not None:
        qmodule.SHIFTED_GROUPS[wqtype] = shift
    try:
        yield
    finally:
        qmodule.SHIFTED_GROUPS.update(saved)


def quantized(model, group_size, weights, activations=None, shift=None):
    mode = "dynamic" if activations is not None else "static"
    with shifted(weights, shift):
        q = quantize(model, weights=weights, activations=activations, activation_mode=mode, inplace=False,
                     group_size=group_size)  # fmt: skip
        return freeze(q)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = demo.load_encoder()
    batches = demo.tokenize(tokenizer, load_sentences()[: args.sentences])
    reference = demo.embed(model, batches)
    float_bytes = demo.checkpoint_bytes(model)
    print(f"all-MiniLM-L6-v2, {args.sentences} sentences, groups of {args.group_size}", flush=True)
    print(f"  {'weights':<32}{'cosine mean':>12}{'cosine min':>12}{'neighbours %':>14}{'ckpt vs fp32':>14}")
    for name, config in CONFIGS.items():
        q = quantized(model, args.group_size, **config)
        out = demo.embed(q, batches)
        cosine = F.cosine_similarity(out, reference, dim=-1)
        agreement = demo.neighbour_agreement(reference, out)
        size = demo.checkpoint_bytes(q) / float_bytes
        print(f"  {name:<32}{cosine.mean():>12.4f}{cosine.min():>12.4f}{agreement:>14.1f}{size:>14.3f}")


if __name__ == "__main__":
    main()
