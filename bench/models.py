"""Whole-model benchmark on the CPU: an encoder (pretrained all-MiniLM-L6-v2, see examples/demo.py) and a
Llama-style decoder block stack (examples/transformer.py's model, random weights), at batch 1 and 32:
float32 eager vs quanto_fx W8A8 dynamic eager vs compiled with backend="quanto", float8 (e4m3fn weights
and dynamic activations) eager, plus torch.ao quantize_dynamic. Accuracy is the output's cosine similarity
to float32; memory is the parameter bytes. ``--dtype bfloat16`` (or float16) runs the models in that dtype,
the baseline and the reference being the 16-bit model (quantize_dynamic takes float32 only: not run).

    .venv/bin/python bench/models.py [--repeats 5] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import demo  # noqa: E402
import transformer  # noqa: E402

import quanto_fx  # noqa: E402
from quanto_fx import freeze, qfloat8_e4m3fn, quantize  # noqa: E402


def parameter_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        quantized = isinstance(p, quanto_fx.tensor.base.QuantizedTensor)
        total += p.nbytes_in_memory() if quantized else p.numel() * p.element_size()
    return total


def as_float(out) -> torch.Tensor:
    out = out.logits if hasattr(out, "logits") else out
    return out.dequantize() if isinstance(out, quanto_fx.QTensor) else out


@torch.no_grad()
def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def encoder_inputs(batch: int):
    model, tokenizer = demo.load_encoder()
    ids, mask = demo.tokenize(tokenizer, demo.load_sentences()[:batch])[0]
    return model, {"input_ids": ids, "attention_mask": mask}


def decoder_inputs(batch: int):
    text = transformer.load_text()
    vocab = sorted(set(text))
    model = transformer.make_model(len(vocab))
    ids = transformer.windows(transformer.encode(text, vocab))[:batch]
    return model, {"input_ids": ids}


@torch.no_grad()
def bench(name: str, model, inputs: dict, repeats: int, dtype: torch.dtype) -> None:
    warnings.filterwarnings("ignore", module="torch.ao")
    model = model.to(dtype)
    dynamic = freeze(quantize(model, activation_mode="dynamic", inplace=False))
    float8 = {"weights": qfloat8_e4m3fn, "activations": qfloat8_e4m3fn, "activation_mode": "dynamic"}
    variants = {f"{str(dtype).removeprefix('torch.')} eager": model}
    if dtype == torch.float32:
        variants["torch.ao quantize_dynamic"] = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, torch.qint8
        )
    variants["W8A8 dynamic eager"] = dynamic
    variants["W8A8 dynamic quanto"] = torch.compile(dynamic, backend="quanto")
    variants["e4m3fn dynamic eager"] = freeze(quantize(model, inplace=False, **float8))
    reference = as_float(model(**inputs)).float().flatten(1)
    float_ms = None
    print(f"\n{name}")
    print(f"  {'variant':<28}{'ms':>9}{'vs float':>9}{'cosine':>9}{'param MB':>10}")
    for label, variant in variants.items():
        out = as_float(variant(**inputs)).float().flatten(1)
        ms = median_ms(lambda v=variant: v(**inputs), repeats)
        float_ms = float_ms or ms
        cosine = F.cosine_similarity(out, reference).mean().item()
        size = parameter_bytes(variant) / 1e6 if label != "torch.ao quantize_dynamic" else float("nan")
        print(f"  {label:<28}{ms:>9.1f}{ms / float_ms:>9.2f}{cosine:>9.4f}{size:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    for batch in (1, 32):
        bench(
            f"encoder all-MiniLM-L6-v2, batch {batch} x {demo.SEQ_LEN} tokens",
            *encoder_inputs(batch),
            args.repeats,
            dtype,
        )
        decoder = f"Llama-style decoder (2 x 128), batch {batch} x 128 tokens"
        bench(decoder, *decoder_inputs(batch), args.repeats, dtype)


if __name__ == "__main__":
    main()
