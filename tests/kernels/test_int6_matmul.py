"""Triton int6 dequant-matmul (pgolf.kernels.int6_matmul) against dequantize-then-matmul and float64.

On CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32 and
fp16; bf16 and record shapes are @pytest.mark.gpu. Expected values come from pgolf.kernels.int6_pack's
dequantize (the artifact's definition) and plain torch matmuls.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import pgolf.kernels
from pgolf.kernels import launcher, reference
from pgolf.kernels.int6_pack import dequantize, pack_int6, unpack_int6

im = importlib.import_module("pgolf.kernels.int6_matmul")
Int6Linear = im.Int6Linear
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_weight(N: int, K: int, seed: int, device=DEV):
    """int6 values in [-32, 31] (both ends included) and positive fp16 per-row scales."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-32, 32, (N, K), generator=g, dtype=torch.int8)
    q[0, 0], q[-1, -1] = -32, 31
    s = (torch.rand(N, generator=g) * 0.03 + 0.002).to(torch.float16)
    return q.to(device), s.to(device)


def make_x(M: int, K: int, dtype, seed: int, device=DEV) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(device=device, dtype=dtype)


def expected(x, q_int8, s) -> torch.Tensor:
    """float64 x · (q·s)ᵀ."""
    return x.double() @ (q_int8.double() * s.double()[:, None]).T


def assert_matches(y, x, q_int8, s, packed):
    """y equals dequantize-then-matmul in x's dtype within that dtype's tolerance (relative to |y|max), and its
    error against float64 is no worse than the reference's."""
    q = pack_int6(q_int8) if packed else q_int8
    ref = reference.int6_matmul(x, q, s, in_features=q_int8.shape[1], packed=packed)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite outputs"
    scale = ref.abs().max().item() + 1e-6
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x.dtype]
    assert (y.float() - ref.float()).abs().max().item() <= tol * scale
    truth = expected(x, q_int8, s)
    err_k = (y.double() - truth).abs().max().item()
    err_r = (ref.double() - truth).abs().max().item()
    assert err_k <= 2 * err_r + 1e-6 * scale


# ---- layout ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 4, 37, 64, 129])
def test_pack_unpack_round_trip(K):
    q, _ = make_weight(5, K, seed=K, device="cpu")
    packed = pack_int6(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3 * ((K + 3) // 4))
    assert torch.equal(unpack_int6(packed, K), q)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("K", [37, 129])
def test_kernel_decodes_every_weight_exactly(K, packed):
    """x = I_K gives y = (q·s)ᵀ exactly in fp32 (exact integer decode, exact fp32 product)."""
    q, s = make_weight(33, K, seed=1 + K)
    qq = pack_int6(q) if packed else q
    y = im.launch(torch.eye(K, device=DEV), qq, s, in_features=K, packed=packed)
    assert torch.equal(y, dequantize(q, s, dtype=torch.float32).T)


# ---- matches dequantize + matmul -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("K", [37, 64, 129])
@pytest.mark.parametrize("M", [1, 5, 37])
def test_matches_dequant_matmul_small_m(M, K, packed, dtype):
    q, s = make_weight(33, K, seed=M * 1000 + K)
    x = make_x(M, K, dtype, seed=M + K)
    qq = pack_int6(q) if packed else q
    y = im.int6_matmul(x, qq, s, in_features=K, packed=packed)
    assert_matches(y, x, q, s, packed)


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_through_the_interpreter_upcast(packed):
    """bf16 x (on CPU the kernel upcasts bf16 tiles to fp32 before tl.dot, on a GPU it is the bf16 dot)."""
    M, K, N = 5, 64, 33
    q, s = make_weight(N, K, seed=5)
    x = make_x(M, K, torch.bfloat16, seed=6)
    qq = pack_int6(q) if packed else q
    assert_matches(im.int6_matmul(x, qq, s, in_features=K, packed=packed), x, q, s, packed)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_m_path(packed, dtype):
    """M > 64 takes the tiled-GEMM path (default interpreter tiles and a small-tile grouped order)."""
    M, K, N = 70, 129, 33
    q, s = make_weight(N, K, seed=7)
    x = make_x(M, K, dtype, seed=8)
    qq = pack_int6(q) if packed else q
    assert_matches(im.launch(x, qq, s, in_features=K, packed=packed), x, q, s, packed)
    cfg = dict(BM=32, BN=16, BK=32, GROUP_M=2)  # 3x3 tiles: the last row group is partial
    assert_matches(im.launch(x, qq, s, in_features=K, packed=packed, config=cfg), x, q, s, packed)


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_split_k_path(split, packed):
    """Split-K partials + reduce; with 3 splits of 64 over K=129 the last split holds one column."""
    M, K, N = 5, 129, 33
    q, s = make_weight(N, K, seed=11)
    x = make_x(M, K, torch.float32, seed=12)
    qq = pack_int6(q) if packed else q
    y = im.launch(x, qq, s, in_features=K, packed=packed, config=dict(BN=16, BK=32, GROUP_M=1, SPLIT_K=split))
    assert_matches(y, x, q, s, packed)


@pytest.mark.parametrize("packed", [False, True])
def test_nan_poisoned_buffers_are_fully_written(monkeypatch, packed):
    monkeypatch.setattr(launcher, "POISON", True)
    K, N = 37, 33
    q, s = make_weight(N, K, seed=13)
    qq = pack_int6(q) if packed else q
    for M, cfg in [(5, None), (5, dict(BN=16, BK=16, GROUP_M=1, SPLIT_K=2)), (70, None)]:
        x = make_x(M, K, torch.float32, seed=M)
        assert_matches(im.launch(x, qq, s, in_features=K, packed=packed, config=cfg), x, q, s, packed)


# ---- shapes, views, int64 ---------------------------------------------------------------------------------------

def test_leading_dims_and_strided_views():
    K, N = 64, 33
    q, s = make_weight(N, K, seed=21)
    x3 = make_x(2 * 3, K, torch.float32, seed=22).view(2, 3, K)
    y3 = im.int6_matmul(x3, q, s, in_features=K, packed=False)
    assert y3.shape == (2, 3, N)
    torch.testing.assert_close(y3, reference.int6_matmul(x3, q, s, in_features=K, packed=False))
    # x with a column stride of 2, q and packed q as column slices of wider tensors, scale non-contiguous
    xw = make_x(5, 2 * K, torch.float32, seed=23)[:, ::2]
    qbig = torch.zeros(N, K + 7, dtype=torch.int8, device=DEV)
    qbig[:, 3:3 + K] = q
    pbig = torch.zeros(N, 3 * K // 4 + 5, dtype=torch.uint8, device=DEV)
    pbig[:, 2:2 + 3 * K // 4] = pack_int6(q)
    sbig = torch.stack([s, s], dim=1)[:, 0]
    assert not xw.is_contiguous() and not sbig.is_contiguous()
    want = reference.int6_matmul(xw.contiguous(), q, s, in_features=K, packed=False)
    torch.testing.assert_close(im.int6_matmul(xw, qbig[:, 3:3 + K], sbig, in_features=K, packed=False), want)
    torch.testing.assert_close(im.int6_matmul(xw, pbig[:, 2:2 + 3 * K // 4], sbig, in_features=K, packed=True),
                               want)


def _sparse_tensor(path, numel: int, dtype) -> torch.Tensor:
    """A file-backed tensor of ``numel`` elements that is only virtual memory (sparse file, shared mmap)."""
    with open(path, "wb") as f:
        f.truncate(numel * torch.empty((), dtype=dtype).element_size())
    if os.stat(path).st_blocks * 512 > 1 << 24:
        pytest.skip("filesystem without sparse files")
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


@pytest.mark.skipif(GPU, reason="the CPU int64 probe; the GPU has test_gpu_int64_offsets")
@pytest.mark.parametrize("packed", [False, True])
def test_int64_offsets_with_huge_strides(tmp_path, packed):
    """x and q rows with strides of 2^26+64 elements: the last rows sit past 2^31 elements (bytes for q), so an
    int32 offset would wrap. The views start 2^31 elements into their (sparse) storage, so a wrapped offset reads
    zeros there instead of faulting, and the result would be wrong."""
    M, K, N, stride = 37, 64, 33, 2 ** 26 + 64
    base = 2 ** 31
    q, s = make_weight(N, K, seed=31, device="cpu")
    x0 = make_x(M, K, torch.float16, seed=32, device="cpu")
    qq = pack_int6(q) if packed else q
    xs = _sparse_tensor(tmp_path / "x.bin", base + M * stride, torch.float16)
    x = xs.as_strided((M, K), (stride, 1), base)
    x.copy_(x0)
    qs = _sparse_tensor(tmp_path / "q.bin", base + N * stride, qq.dtype)
    qv = qs.as_strided(tuple(qq.shape), (stride, 1), base)
    qv.copy_(qq)
    assert (M - 1) * stride >= 2 ** 31 and (N - 1) * stride >= 2 ** 31
    y = im.launch(x, qv, s, in_features=K, packed=packed)
    assert_matches(y, x0, q, s, packed)


# ---- op plumbing -------------------------------------------------------------------------------------------------

def test_requires_grad_raises_clearly():
    q, s = make_weight(33, 37, seed=41)
    x = make_x(3, 37, torch.float32, seed=42).requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        im.int6_matmul(x, q, s, in_features=37, packed=False)
    with torch.no_grad():
        assert im.int6_matmul(x, q, s, in_features=37, packed=False).shape == (3, 33)


def test_bad_arguments_raise():
    q, s = make_weight(33, 37, seed=43)
    x = make_x(3, 37, torch.float32, seed=44)
    with pytest.raises(ValueError, match="in_features"):
        im.int6_matmul(x, q, s, in_features=36, packed=False)
    with pytest.raises(ValueError, match="packed q"):
        im.int6_matmul(x, q, s, in_features=37, packed=True)
    with pytest.raises(ValueError, match="scale"):
        im.int6_matmul(x, q, s[:-1], in_features=37, packed=False)


def test_dispatch_and_torch_compile_fullgraph():
    K = 37
    q, s = make_weight(33, K, seed=51)
    qp = pack_int6(q)
    x = make_x(5, K, torch.float32, seed=52)
    with pgolf.kernels.use_backend("triton", op="int6_matmul"):
        assert pgolf.kernels.implementation("int6_matmul", x.device.type) == ("triton", im.int6_matmul)
        y = pgolf.kernels.int6_matmul(x, qp, s, in_features=K, packed=True)  # still callable after the import
    assert_matches(y, x, q, s, True)

    def f(x):
        return torch.ops.pgolf.int6_matmul(x, qp, s, K, True) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), 2.0 * y)


def test_int6_linear_module():
    K, N = 37, 33
    q, s = make_weight(N, K, seed=61)
    x = make_x(2 * 5, K, torch.float32, seed=62).view(2, 5, K)
    for packed in (False, True):
        layer = Int6Linear(pack_int6(q) if packed else q, s, in_features=K, packed=packed)
        assert (layer.in_features, layer.out_features, layer.packed) == (K, N, packed)
        assert set(layer.state_dict()) == {"q", "scale"}
        w = layer.dequantized_weight(torch.float32)
        assert torch.equal(w, dequantize(q, s, dtype=torch.float32))
        with pgolf.kernels.use_backend("triton", op="int6_matmul"), torch.no_grad():
            y = layer(x)
        torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
        with pgolf.kernels.use_backend("reference", op="int6_matmul"):
            torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Int6Linear"):
        Int6Linear(q, s, in_features=K, packed=True)


# ---- GPU (bf16, record shapes, real int64 sizes) ----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("N", [512, 2048])
@pytest.mark.parametrize("M", [1, 16, 128, 4096])
def test_gpu_bf16_record_shapes(M, N, packed):
    K = 512
    q, s = make_weight(N, K, seed=M + N)
    x = make_x(M, K, torch.bfloat16, seed=M)
    qq = pack_int6(q) if packed else q
    assert_matches(im.int6_matmul(x, qq, s, in_features=K, packed=packed), x, q, s, packed)


@pytest.mark.gpu
def test_gpu_weight_dominated_and_large_m():
    q, s = make_weight(4096, 4096, seed=71)
    for M in (1, 16, 64):
        x = make_x(M, 4096, torch.bfloat16, seed=M)
        for packed in (False, True):
            qq = pack_int6(q) if packed else q
            assert_matches(im.int6_matmul(x, qq, s, in_features=4096, packed=packed), x, q, s, packed)
    q, s = make_weight(2048, 512, seed=72)
    x = make_x(98304, 512, torch.bfloat16, seed=73)
    assert_matches(im.int6_matmul(x, pack_int6(q), s, in_features=512, packed=True), x, q, s, True)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_int64_offsets(packed):
    """A weight with more than 2^31 bytes (N·bytes_per_row > 2^31): rows past the int32 range must be right."""
    K = 4096
    row_bytes = 3 * K // 4 if packed else K
    N = (2 ** 31) // row_bytes + 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randint(-32, 32, (N, K), generator=g, device="cuda", dtype=torch.int8)
    s = (torch.rand(N, generator=g, device="cuda") * 0.03 + 0.002).half()
    qq = torch.cat([pack_int6(q[i:i + 2 ** 16]) for i in range(0, N, 2 ** 16)]) if packed else q  # bounded memory
    x = make_x(3, K, torch.bfloat16, seed=74)
    y = im.int6_matmul(x, qq, s, in_features=K, packed=packed)
    tail = slice(N - 128, N)
    assert_matches(y[:, tail].contiguous(), x, q[tail], s[tail], packed)
