"""The fused clip-and-noise ops (csrc/ kernels) against their references."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import philox4x32_10, philox_normals

from torchdp_keras import ops
from torchdp_keras.ops import fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = ops.extension_info()["cpu"]
needs_kernel = pytest.mark.skipif(
    not KERNEL, reason=f"fused CPU kernel not built: {ops.extension_info()['reason']}"
)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.extension_info()["cuda"]),
    reason="needs a GPU and the CUDA kernel",
)


def _one_at_a_time(grads, clip):
    """Slow, obviously correct: clip each example's flattened gradient, then sum."""
    batch = grads[0].shape[0]
    total = [np.zeros(g.shape[1:]) for g in grads]
    norms = []
    for i in range(batch):
        rows = [g[i].double().numpy() for g in grads]
        norm = np.sqrt(sum(float(np.sum(r * r)) for r in rows))
        norms.append(norm**2)
        factor = min(1.0, clip / (norm * (1 + ops.CLIP_SAFETY_MARGIN))) if norm > 0 else 1.0
        for t, r in zip(total, rows):
            t += factor * r
    return total, np.array(norms)


def _grads(batch, shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *s), generator=gen, dtype=dtype) * 0.3 for s in shapes]


def test_philox_reference_matches_random123_known_answers():
    assert [int(v) for v in philox4x32_10((0, 0, 0, 0), (0, 0))] == [
        0x6627E8D5,
        0xE169C58D,
        0xBC57AC4C,
        0x9B00DBD8,
    ]
    assert [int(v) for v in philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF))] == [
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    ]
    counter = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert [int(v) for v in philox4x32_10(counter, (0xA4093822, 0x299F31D0))] == [
        0xD16CFE09,
        0x94FDCCEB,
        0x5001E420,
        0x24126EA1,
    ]


def test_basic_operation_box_muller_is_accurate():
    # The kernels' log/sin/cos (basic operations only) against libm.
    n = np.arange(0, 20000, dtype=np.uint64)
    ours = philox_normals(99, 0, n.size)
    from helpers import _uniform53

    counter = n >> np.uint64(1)
    x0, x1, x2, x3 = philox4x32_10(
        (counter & np.uint64(0xFFFFFFFF), counter >> np.uint64(32), 0 * n, 0 * n), (99, 0)
    )
    u1, u2 = _uniform53(x0, x1), _uniform53(x2, x3)
    radius = np.sqrt(-2.0 * np.log(u1))
    exact = np.where(n % 2 == 1, radius * np.sin(2 * np.pi * u2), radius * np.cos(2 * np.pi * u2))
    np.testing.assert_allclose(ours, exact, rtol=1e-12, atol=1e-13)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_noise_is_the_philox_stream_bit_for_bit(dtype):
    tensors = [torch.zeros(1001, dtype=dtype), torch.zeros(3, 5, dtype=dtype)]
    ops.add_noise_and_scale_(tensors, 1.0, 1.0, seed=12345678901234, offset=7)
    got = torch.cat([t.flatten() for t in tensors]).numpy()
    expected = philox_normals(12345678901234, 7, got.size).astype(got.dtype)
    np.testing.assert_array_equal(got, expected)


@needs_kernel
@pytest.mark.parametrize(
    "batch, shapes",
    [(7, [(5,), (3, 4)]), (64, [(300,)]), (1, [(2, 2, 2)]), (2, [(1200000,), (50, 2000)])],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_clipped_sum_equals_the_one_example_reference(batch, shapes, dtype):
    grads = _grads(batch, shapes, dtype)
    grads[0][0].zero_()  # a zero gradient keeps factor 1
    clip = 0.7
    sums, squared = ops.clipped_sum_and_norms(grads, clip)
    expected, expected_sq = _one_at_a_time(grads, clip)
    # float32 rows: blocks of 8 squares in float32, within the clip margin.
    margin = 1e-12 if dtype == torch.float64 else ops.CLIP_SAFETY_MARGIN / 2
    np.testing.assert_allclose(squared.numpy(), expected_sq, rtol=margin)
    # Relative 1e-6 of each tensor's scale (elementwise, float32 sums of many
    # examples cancel: their rounding is relative to the terms, not the sum).
    for s, e in zip(sums, expected):
        assert s.dtype == dtype and s.shape == e.shape
        np.testing.assert_allclose(s.numpy(), e, rtol=1e-6, atol=1e-6 * np.abs(e).max())
    ref_sums, ref_sq = fused.reference_clipped_sum_and_norms(grads, clip)
    for s, r in zip(sums, ref_sums):
        scale = float(r.abs().max())
        np.testing.assert_allclose(s.numpy(), r.numpy(), rtol=1e-6, atol=1e-6 * scale)
    noiseless = ops.clip_and_noise(grads, clip, 0.0, seed=1)
    for s, r in zip(noiseless, sums):
        torch.testing.assert_close(s, r)


@needs_kernel
@pytest.mark.parametrize("extra", [0, 1], ids=["one-read", "two-reads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_sides_of_the_one_read_limit_equal_the_reference(extra, dtype):
    limit = ops.extension_info()["cpu_one_read_bytes"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    # An example of exactly `limit` bytes over two tensors, or one value more.
    width = limit // itemsize + extra
    grads = _grads(3, [(width - 100,), (100,)], dtype, seed=extra)
    sums, squared = ops.clipped_sum_and_norms(grads, 50.0)
    expected, expected_sq = _one_at_a_time(grads, 50.0)
    margin = 1e-12 if dtype == torch.float64 else ops.CLIP_SAFETY_MARGIN / 2
    np.testing.assert_allclose(squared.numpy(), expected_sq, rtol=margin)
    for s, e in zip(sums, expected):
        np.testing.assert_allclose(s.numpy(), e, rtol=1e-6, atol=1e-6 * np.abs(e).max())


def test_extension_info_reports_the_one_read_limit():
    info = ops.extension_info()
    if info["cpu"]:
        limit = info["cpu_one_read_bytes"]
        assert isinstance(limit, int) and (1 << 16) <= limit <= (4 << 20)
    else:
        assert info["cpu_one_read_bytes"] is None


@needs_kernel
@pytest.mark.parametrize("width", [7, 64, 1000, 70001])
def test_kernel_float32_norms_stay_within_the_clipping_margin(width):
    rng = np.random.default_rng(width)
    # Values over 12 orders of magnitude, as per-example gradients can be.
    values = rng.normal(size=(16, width)) * 10.0 ** rng.uniform(-6, 6, (16, width))
    rows = torch.from_numpy(values.astype("float32"))
    exact = np.sum(rows.double().numpy() ** 2, axis=1)
    _, squared = ops.clipped_sum_and_norms([rows], 1.0)
    np.testing.assert_allclose(squared.numpy(), exact, rtol=ops.CLIP_SAFETY_MARGIN / 2, atol=0)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_noise_statistics_seeds_and_offsets(use_kernel, monkeypatch):
    if use_kernel and not KERNEL:
        pytest.skip("fused CPU kernel not built")
    if not use_kernel:
        monkeypatch.setattr(fused, "_use_kernel", lambda tensors: False)

    def noise(seed, offset, n=40000, std=2.5):
        grads = [torch.zeros(2, n)]
        return ops.clip_and_noise(grads, 1.0, std, seed=seed, offset=offset)[0]

    a = noise(5, 0)
    assert abs(float(a.mean())) < 4 * 2.5 / np.sqrt(a.numel())
    assert abs(float(a.std()) / 2.5 - 1) < 0.02  # 2/3x or 3/2x the std fails by far
    assert torch.equal(a, noise(5, 0))  # same (seed, offset): same noise
    b, c = noise(5, 40000), noise(6, 0)
    for other in (b, c):  # another offset range or another seed: independent
        assert abs(float(np.corrcoef(a.numpy(), other.numpy())[0, 1])) < 0.03
    if use_kernel:  # the stream property: offset k starts at number k
        torch.testing.assert_close(noise(5, 100)[:-100], a[100:], rtol=0, atol=0)


@needs_kernel
def test_add_noise_and_scale_in_place_and_scaled():
    t = [torch.full((10000,), 3.0)]
    out = ops.add_noise_and_scale_(t, 0.5, 0.25, seed=3)
    assert out[0] is t[0]
    assert abs(float(t[0].mean()) - 0.75) < 0.01
    assert abs(float(t[0].std()) / 0.125 - 1) < 0.05


@needs_kernel
def test_opcheck():
    grads = _grads(6, [(4,), (2, 3)])
    torch.library.opcheck(torch.ops.torchdp_keras.clipped_sum.default, (grads, 1.0))
    torch.library.opcheck(torch.ops.torchdp_keras.clip_and_noise.default, (grads, 1.0, 0.0, 3, 0))
    torch.library.opcheck(
        torch.ops.torchdp_keras.add_noise_and_scale_.default,
        ([torch.zeros(5), torch.zeros(2, 2)], 1.0, 0.5, 3, 0),
    )


@needs_kernel
def test_fused_op_traces_under_torch_compile():
    grads = _grads(4, [(3,)])

    @torch.compile(backend="eager", fullgraph=True)
    def step(g):
        return torch.ops.torchdp_keras.clip_and_noise(g, 1.0, 0.0, 0, 0)

    torch.testing.assert_close(step(grads)[0], ops.clip_and_noise(grads, 1.0, 0.0)[0])


def test_bad_arguments_name_the_argument():
    grads = _grads(3, [(2,)])
    with pytest.raises(ValueError, match="l2_norm_clip=-1"):
        ops.clip_and_noise(grads, -1, 1.0)
    with pytest.raises(ValueError, match="noise_std=-0.5"):
        ops.clip_and_noise(grads, 1.0, -0.5)
    with pytest.raises(ValueError, match="offset=-2"):
        ops.clip_and_noise(grads, 1.0, 1.0, offset=-2)
    with pytest.raises(ValueError, match="seed=-1"):
        ops.clip_and_noise(grads, 1.0, 1.0, seed=-1)
    with pytest.raises(ValueError, match="per_example_grads=\\[\\]"):
        ops.clip_and_noise([], 1.0, 1.0)


@needs_kernel
def test_kernel_errors_are_readable():
    with pytest.raises(RuntimeError, match=r"batch of grads\[0\] \(3\).*grads\[1\].shape"):
        torch.ops.torchdp_keras.clipped_sum([torch.zeros(3, 2), torch.zeros(4, 2)], 1.0)
    with pytest.raises(RuntimeError, match="expected one dtype"):
        torch.ops.torchdp_keras.clipped_sum(
            [torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.float64)], 1.0
        )
    with pytest.raises(RuntimeError, match="l2_norm_clip=0"):
        torch.ops.torchdp_keras.clipped_sum([torch.zeros(3, 2)], 0.0)


def test_disabled_extension_falls_back_with_the_reason():
    code = (
        "import torch, torchdp_keras.ops as o;"
        "info = o.extension_info(); print(info['loaded'], info['reason']);"
        "print(float(o.clip_and_noise([torch.ones(4, 3)], 1.0, 0.0)[0][0]))"
    )
    env = dict(os.environ, TORCHDP_KERAS_DISABLE_EXT="1", KERAS_BACKEND="torch")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "False disabled by TORCHDP_KERAS_DISABLE_EXT=1"
    assert abs(float(out[1]) - 4 / np.sqrt(3) / (1 + 1e-6)) < 1e-5


@needs_cuda
def test_cuda_kernel_matches_cpu_bit_for_bit_noise_and_the_clipped_sum():
    grads = _grads(33, [(17,), (4, 5)])
    cpu = ops.clip_and_noise(grads, 0.5, 1.3, seed=77, offset=5)
    gpu = ops.clip_and_noise([g.cuda() for g in grads], 0.5, 1.3, seed=77, offset=5)
    noise_cpu = [torch.zeros(17), torch.zeros(4, 5)]
    noise_gpu = [t.cuda() for t in noise_cpu]
    ops.add_noise_and_scale_(noise_cpu, 1.0, seed=77, offset=5)
    ops.add_noise_and_scale_(noise_gpu, 1.0, seed=77, offset=5)
    for a, b in zip(noise_cpu, noise_gpu):
        assert torch.equal(a, b.cpu())
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    command = [
        "nvcc",
        "-c",
        os.path.join(ROOT, "csrc", "clip_noise_cuda.cu"),
        "-o",
        str(tmp_path / "clip_noise_cuda.o"),
        "-std=c++20",
        "-fmad=false",
        "-Xcompiler",
        "-fPIC",
        "-Xcompiler",
        "-idirafter",
        "-Xcompiler",
        os.path.join(ROOT, "csrc", "compat"),
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{sysconfig.get_paths()['include']}",
        *[f"-I{p}" for p in include_paths()],
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
