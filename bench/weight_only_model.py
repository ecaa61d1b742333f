"""Weight-only formats on a whole model at decoding-like sizes — CPU: pretrained all-MiniLM-L6-v2 (see
examples/demo.py) on 1 to 16 tokens, float32 eager against int8 / int4 / int2 / float8 weight-only copies
(eager). A layer timed alone in a loop keeps its weights in the core's L2; in a model each layer's weights
come back from L3 after the other layers', which is what this measures.

    .venv/bin/python bench/weight_only_model.py [--repeats 9] [--tokens 1 2 4 8 16]

Each variant is timed round-robin with the others (median ms of `repeats` runs of 5 calls); ratios are to
float32 in the same run; "rel.err" is ||y - y_fp32|| / ||y_fp32|| of the sentence embeddings.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import demo  # noqa: E402
from weight_only import QUANTO_WEIGHTS as FORMATS  # noqa: E402

from quanto_fx import freeze, quantize  # noqa: E402

CALLS_PER_RUN = 5


def median_ms(models: dict, ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> dict[str, float]:
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            model(ids, mask)
            start = time.perf_counter()
            for _ in range(CALLS_PER_RUN):
                model(ids, mask)
            times[name].append((time.perf_counter() - start) / CALLS_PER_RUN * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    encoder, _ = demo.load_encoder()
    encoder.eval()
    models = {"fp32": encoder}
    for name, qtype in FORMATS.items():
        models[name] = freeze(quantize(copy.deepcopy(encoder), weights=qtype, activations=None))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    print(f"{'tokens':>6}{'fp32 ms':>9}" + "".join(f"{name:>15}" for name in FORMATS) + "   (time / fp32)")
    torch.manual_seed(0)
    errors = {}
    with torch.inference_mode():
        for tokens in args.tokens:
            ids = torch.randint(1000, 5000, (1, tokens))
            mask = torch.ones(1, tokens, dtype=torch.long)
            medians = median_ms(models, ids, mask, args.repeats)
            reference = encoder(ids, mask)
            for name in FORMATS:
                error = ((models[name](ids, mask) - reference).norm() / reference.norm()).item()
                errors[name] = max(errors.get(name, 0.0), error)
            ratios = "".join(f"{medians[name] / medians['fp32']:>15.2f}" for name in FORMATS)
            print(f"{tokens:>6}{medians['fp32']:>9.2f}{ratios}")
    print(f"{'rel.err':>15}" + "".join(f"{errors[name]:>15.4f}" for name in FORMATS))


if __name__ == "__main__":
    main()
