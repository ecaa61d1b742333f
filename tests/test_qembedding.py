"""QEmbedding: quantized embedding tables (int8 / float8 per row, int4 / int2 per group), looked up by row."""

import re

import pytest
import torch
import torch.nn.functional as F

import quanto_fx
from quanto_fx import PackedQTensor, QTensor, freeze, qfloat8_e4m3fn, qint2, qint4, qint8, quantize
from quanto_fx.nn import QEmbedding
from quanto_fx.tensor import fallback_counts, reset_fallback_counts

from .utils import sqnr


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(500, 128, padding_idx=0), torch.nn.Linear(128, 32))


IDS = torch.tensor([[0, 5, 499, 5], [7, 1, 2, 3]])


@pytest.mark.parametrize(
    "wqtype, min_sqnr", [(qint8, 40.0), (qfloat8_e4m3fn, 28.0), (qint4, 17.0), (qint2, 3.0)]
)
def test_lookup_reads_the_quantized_rows_and_only_them(wqtype, min_sqnr):
    float_model = model()
    q = freeze(quantize(float_model, weights=wqtype, activations=None, inplace=False, group_size=64))
    table = q[0].weight
    assert isinstance(q[0], QEmbedding) and isinstance(
        table, PackedQTensor if wqtype in (qint4, qint2) else QTensor
    )
    reset_fallback_counts()
    with torch.no_grad():
        rows = q[0](IDS)
    assert fallback_counts() == {}  # no dequantization of the whole table
    assert rows.dtype == torch.float32 and rows.shape == (2, 4, 128)
    assert torch.equal(rows, table.dequantize()[IDS])  # exactly the dequantized rows
    assert sqnr(float_model[0](IDS), rows) > min_sqnr


def test_packed_tables_keep_no_gemm_layout(aten_weight_kernels):
    q = freeze(quantize(model(), weights=qint4, activations=None, inplace=False, group_size=64))
    assert q[0].weight._kernel is None and q[1].weight._kernel is not None
    assert q[0].weight.nbytes_in_memory() == q[0].weight.nbytes_stored()


def test_training_the_float_table_through_quantization():
    q = quantize(model(), weights=qint4, activations=None, group_size=64)
    q(IDS).sum().backward()
    grad = q[0].weight.grad
    assert grad is not None and grad[5].abs().sum() > 0 and grad[0].abs().sum() == 0  # padding row: no grad
    assert grad[100].abs().sum() == 0  # rows not looked up get nothing


def test_checkpoints_round_trip_exactly(tmp_path):
    q = freeze(quantize(model(), weights=qint4, activations=None, inplace=False, group_size=64))
    path = tmp_path / "emb.safetensors"
    quanto_fx.save(q, path)
    loaded = quanto_fx.load(path, model())
    assert torch.equal(loaded[0].weight._packed, q[0].weight._packed) and loaded[0].weight._kernel is None
    assert torch.equal(loaded(IDS), q(IDS))


def test_compiled_lookup_matches_eager():
    q = freeze(quantize(model(), weights=qint8, activations=None, inplace=False))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(q, backend="quanto")(IDS), q(IDS), rtol=1e-5, atol=1e-5)


def test_unsupported_tables_are_refused_with_their_name():
    with pytest.raises(ValueError, match="max_norm"):
        quantize(torch.nn.Sequential(torch.nn.Embedding(10, 16, max_norm=1.0)))
    with pytest.raises(ValueError, match="cannot quantize '0': group_size 128 does not divide the 48"):
        quantize(torch.nn.Sequential(torch.nn.Embedding(10, 48)), weights=qint4, activations=None)


def test_functional_embedding_on_an_int8_table_is_the_row_gather():
    table = QTensor.quantize(torch.randn(50, 8), qint8, axis=0)
    ids = torch.tensor([3, 3, 49])
    assert torch.equal(F.embedding(ids, table), table.dequantize()[ids])


@pytest.mark.parametrize("wqtype", [qint8, qint4])
def test_out_of_range_indices_raise_like_a_float_table(wqtype):
    float_model = model()
    q = freeze(quantize(float_model, weights=wqtype, activations=None, inplace=False, group_size=64))
    for bad in (-1, 500):
        with pytest.raises(IndexError, match="^index out of range in self$") as float_error:
            float_model[0](torch.tensor([bad]))
        with pytest.raises(IndexError, match=f"^{re.escape(str(float_error.value))}$"):
            q[0](torch.tensor([bad]))
