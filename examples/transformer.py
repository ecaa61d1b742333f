"""Quantize a Llama-style decoder end to end: RMSNorm, attention and MLP blocks.

A small LlamaForCausalLM (transformers, built from a config: nothing downloaded) is trained for a minute as
a character-level language model on real English text that ships with Python (the docstrings of standard
library modules), then quantized three ways and compared with the float model on held-out text:

- W8A8 dynamic: int8 weights, per-token int8 activation scales computed at run time (no calibration);
- W8A8 static, absmax calibration (the seed's observer);
- W8A8 static, percentile calibration (outlier-robust);
- W4: int4 weights (groups of 128), float activations;
- W4/W8 mixed: per layer int4 / int8 / float weights chosen by ``choose_precision`` for a logits SQNR budget.

Reports perplexity, next-token agreement with the float model and logits SQNR, and checks that the model
compiled with ``backend="quanto"`` computes what the eager one does.

    python examples/transformer.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from stdlib_text import load_text
from transformers import LlamaConfig, LlamaForCausalLM

import quanto_fx
from quanto_fx import calibration, choose_precision, freeze, qint4, quantize

MIXED_BUDGET_DB = 30.0  # logits SQNR the mixed-precision plan must keep on the calibration windows


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def make_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def batches(tokens: torch.Tensor, seq: int, batch: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=generator)
        yield torch.stack([tokens[s : s + seq] for s in starts])


def train(model, tokens: torch.Tensor, steps: int, seq: int = 64, batch: int = 32) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    stream = batches(tokens, seq, batch, torch.Generator().manual_seed(0))
    for _ in range(steps):
        ids = next(stream)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def windows(tokens: torch.Tensor, seq: int = 128) -> torch.Tensor:
    n = (len(tokens) - 1) // seq
    return tokens[: n * seq].reshape(n, seq)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids).logits
    return out.dequantize() if isinstance(out, quanto_fx.QTensor) else out


@torch.no_grad()
def evaluate(model, reference_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    out = logits(model, ids)
    loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    agree = (out.argmax(-1) == reference_logits.argmax(-1)).float().mean()
    noise = (out - reference_logits).pow(2).mean()
    return {
        "perplexity": math.exp(loss.item()),
        "agreement": 100 * agree.item(),
        "sqnr_db": 10 * math.log10(reference_logits.pow(2).mean().item() / max(noise.item(), 1e-30)),
    }


def run(steps: int = 300, verbose: bool = True) -> dict[str, dict[str, float]]:
    text = load_text()
    vocab = sorted(set(text))
    tokens = encode(text, vocab)
    split = int(0.9 * len(tokens))
    model = make_model(len(vocab))
    train(model, tokens[:split], steps)
    held_out = windows(tokens[split:])
    calibration_ids = windows(tokens[:split])[:32]
    with torch.no_grad():
        reference = logits(model, held_out)
    results = {"float": evaluate(model, reference, held_out)}

    results["W8A8 dynamic"] = evaluate(
        quantize(model, activation_mode="dynamic", inplace=False), reference, held_out
    )
    dynamic = freeze(quantize(model, activation_mode="dynamic", inplace=False))
    results["W8A8 dynamic, quanto"] = evaluate(torch.compile(dynamic, backend="quanto"), reference, held_out)
    for observer in ("absmax", "percentile"):
        qmodel = quantize(model, inplace=False)
        with torch.no_grad(), calibration(observer=observer):
            qmodel(input_ids=calibration_ids)
        results[f"W8A8 static ({observer})"] = evaluate(qmodel, reference, held_out)
    results["W4 (int4 weights)"] = evaluate(
        freeze(quantize(model, weights=qint4, activations=None, inplace=False)), reference, held_out
    )
    plan = choose_precision(model, [calibration_ids], budget=MIXED_BUDGET_DB, progress=verbose)
    results["W4/W8 mixed"] = evaluate(plan.apply(model), reference, held_out) | {
        "weights": plan.weight_bytes / plan.float_bytes,
        "float_layers": plan.counts().get("float", 0),
        "int4_layers": plan.counts().get("qint4", 0),
    }

    if verbose:
        print(f"{'model':<28}{'perplexity':>12}{'agreement %':>14}{'logits SQNR dB':>17}")
        for name, r in results.items():
            print(f"{name:<28}{r['perplexity']:>12.3f}{r['agreement']:>14.2f}{r['sqnr_db']:>17.1f}")
        share = results["W4/W8 mixed"]["weights"]
        print(f"W4/W8 mixed: {plan.counts()} layers, weights {share:.2f}x their float bytes")
    return results


if __name__ == "__main__":
    run()
