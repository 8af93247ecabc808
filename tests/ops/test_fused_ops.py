"""The fused clip-and-noise ops (csrc/ kernels) against their references."""

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, philox4x32_10, philox_normals

from torchdp_keras import ops
from torchdp_keras.ops import fused

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


def _cache_bytes():
    """`{level: bytes}` of CPU 0's data caches (one instance each), from Linux's sysfs."""
    levels = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        with open(os.path.join(index, "type")) as f:
            if f.read().strip() == "Instruction":
                continue
        with open(os.path.join(index, "level")) as f:
            level = int(f.read())
        with open(os.path.join(index, "size")) as f:
            text = f.read().strip()
        levels[level] = int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    return levels


def test_extension_info_reports_the_one_read_limit():
    info = ops.extension_info()
    if not info["cpu"]:
        assert info["cpu_one_read_bytes"] is None and info["cpu_l2_bytes"] is None
        return
    limit = info["cpu_one_read_bytes"]
    assert isinstance(limit, int) and 0 <= limit <= (64 << 20)
    caches = _cache_bytes()
    if 2 in caches:
        assert info["cpu_l2_bytes"] == caches[2]
    if 2 in caches:
        # An example's rows and a thread's sum must both stay in one core's L2.
        assert limit == caches[2] // 4


def _run_with_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "batch, shapes",
    [
        # Several tensors per example; uneven example ranges per worker; an
        # example near the one-read limit (232 KB in float64); fewer examples
        # than 8 per worker (one worker).
        (37, [(1000,), (3, 1001), (5000,), (17,)]),
        (21, [(20000,), (3, 3000), (10,)]),
        (3, [(2047,)]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_read_kernel_equals_the_reference_for_any_thread_count(threads, batch, shapes, dtype):
    grads = _grads(batch, shapes, dtype, seed=threads)
    for g in grads:
        g[batch - 1].mul_(1e-4)  # one example under the clip norm (factor 1)
    itemsize = torch.empty((), dtype=dtype).element_size()
    limit = ops.extension_info()["cpu_one_read_bytes"]
    assert limit == 0 or sum(int(np.prod(s)) for s in shapes) * itemsize <= limit
    sums, squared = _run_with_threads(threads, lambda: ops.clipped_sum_and_norms(grads, 2.0))
    expected, expected_sq = _one_at_a_time(grads, 2.0)
    margin = 1e-12 if dtype == torch.float64 else ops.CLIP_SAFETY_MARGIN / 2
    np.testing.assert_allclose(squared.numpy(), expected_sq, rtol=margin)
    for s, e in zip(sums, expected):
        assert s.shape == e.shape
        np.testing.assert_allclose(s.numpy(), e, rtol=1e-6, atol=1e-6 * np.abs(e).max())


@needs_kernel
def test_one_read_kernel_with_fewer_openmp_threads_than_workers():
    # torch asks for 4 threads, OpenMP's team has at most 2: each thread runs
    # the ranges of two workers. Must finish and be right.
    code = (
        "import torch, numpy as np, torchdp_keras.ops as o;"
        "torch.set_num_threads(4);"
        "g = [torch.randn(9, 30000, generator=torch.Generator().manual_seed(0), "
        "dtype=torch.float64)];"
        "s, sq = o.clipped_sum_and_norms(g, 1.0);"
        "n = g[0].norm(dim=1, keepdim=True);"
        "ref = (g[0] * torch.clamp(1.0 / (n * (1 + o.CLIP_SAFETY_MARGIN)), max=1.0)).sum(0);"
        "print(float((s[0] - ref).abs().max()), float((sq - n[:, 0] ** 2).abs().max()))"
    )
    env = dict(os.environ, OMP_THREAD_LIMIT="2", KERAS_BACKEND="torch")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    sum_error, norm_error = map(float, out.stdout.split())
    assert sum_error < 1e-12 and norm_error < 1e-9


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


# The same checks on every device the kernels serve: the "cpu" cases run
# everywhere the extension is built (they also check the tests themselves),
# the "cuda" ones on a GPU.
ON_DEVICES = [
    pytest.param("cpu", marks=needs_kernel),
    pytest.param("cuda", marks=needs_cuda),
]


@pytest.mark.parametrize("device", ON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "sizes, offset", [((17, 20), 5), ((1,), 0), ((3, 100_003), 2**40 + 1)], ids=str
)
def test_noise_on_every_device_is_the_philox_stream_bit_for_bit(device, dtype, sizes, offset):
    seed = 2**62 + 9
    tensors = [torch.zeros(n, dtype=dtype, device=device) for n in sizes]
    ops.add_noise_and_scale_(tensors, 1.0, 1.0, seed=seed, offset=offset)
    got = torch.cat([t.cpu() for t in tensors]).numpy()
    np.testing.assert_array_equal(got, philox_normals(seed, offset, got.size).astype(got.dtype))


@pytest.mark.parametrize("device", ON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_and_noise_on_every_device_equals_the_reference(device, dtype):
    grads = _grads(33, [(17,), (4, 5)], dtype)
    grads[0][3].zero_()
    on_device = [g.to(device) for g in grads]
    sums, squared = ops.clipped_sum_and_norms(on_device, 0.5)
    expected, expected_sq = _one_at_a_time(grads, 0.5)
    margin = 1e-12 if dtype == torch.float64 else ops.CLIP_SAFETY_MARGIN / 2
    np.testing.assert_allclose(squared.cpu().numpy(), expected_sq, rtol=margin)
    for s, e in zip(sums, expected):
        assert s.device.type == device and s.dtype == dtype
        np.testing.assert_allclose(s.cpu().numpy(), e, rtol=1e-6, atol=1e-6 * np.abs(e).max())
    # Fused with the noise: the clipped sums plus exactly the stream's noise.
    noised = ops.clip_and_noise(on_device, 0.5, 1.3, seed=77, offset=5)
    noise = philox_normals(77, 5, 17 + 20)
    for s, n, out in zip(sums, (noise[:17], noise[17:]), noised):
        expected_out = s.cpu().double().numpy() + 1.3 * n.reshape(s.shape)
        np.testing.assert_allclose(out.cpu().numpy(), expected_out, rtol=1e-6, atol=1e-6)


@needs_cuda
def test_cuda_grid_stride_loops_cover_every_element():
    # Grids are capped at 65535 blocks: more noise pairs than one grid of 256
    # threads holds, more examples than grid.y, a row wider than one grid.
    n = 2 * 65535 * 256 + 1001
    gpu, cpu = torch.zeros(n, device="cuda"), torch.zeros(n)
    ops.add_noise_and_scale_([gpu], 1.0, 0.5, seed=3, offset=1)
    ops.add_noise_and_scale_([cpu], 1.0, 0.5, seed=3, offset=1)
    assert torch.equal(gpu.cpu(), cpu)
    for batch, width in ((70_000, 3), (2, 65535 * 256 + 77)):
        grads = _grads(batch, [(width,)], seed=batch)
        sums, squared = ops.clipped_sum_and_norms([g.cuda() for g in grads], 0.5)
        ref_sums, ref_squared = fused.reference_clipped_sum_and_norms(grads, 0.5)
        torch.testing.assert_close(squared.cpu(), ref_squared, rtol=1e-6, atol=0)
        scale = float(ref_sums[0].abs().max())
        torch.testing.assert_close(sums[0].cpu(), ref_sums[0], rtol=1e-5, atol=1e-6 * scale)


@needs_cuda
def test_cuda_opcheck_and_compile():
    grads = [g.cuda() for g in _grads(6, [(4,), (2, 3)])]
    torch.library.opcheck(torch.ops.torchdp_keras.clipped_sum.default, (grads, 1.0))
    torch.library.opcheck(torch.ops.torchdp_keras.clip_and_noise.default, (grads, 1.0, 0.0, 3, 0))
    compiled = torch.compile(lambda g: ops.clip_and_noise(g, 1.0, 0.0, seed=1), fullgraph=False)
    for a, b in zip(compiled(grads), ops.clip_and_noise(grads, 1.0, 0.0, seed=1)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", ON_DEVICES)
def test_a_dp_step_gives_the_same_weights_on_every_device(device):
    # Same weights, data and seed: the noise is the same Philox stream on CPU
    # and CUDA, so one DP step moves the weights alike up to float rounding.
    import keras

    import torchdp_keras as tdk

    def step(where):
        keras.utils.set_random_seed(1)
        with keras.device(where):
            model = tdk.DPSequential(
                [
                    keras.Input((6,)),
                    keras.layers.Dense(4, activation="tanh"),
                    keras.layers.Dense(3),
                ],
                l2_norm_clip=0.1,
                noise_multiplier=1.0,
                seed=5,
            )
            model.compile(
                optimizer=keras.optimizers.SGD(1.0),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
            )
            x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
            y = np.arange(16) % 3
            before = [w.copy() for w in model.get_weights()]
            model.train_on_batch(x, y)
            assert all(v.value.device.type == torch.device(where).type for v in model.weights)
            return before, model.get_weights()

    before_cpu, after_cpu = step("cpu")
    before_dev, after_dev = step(device)
    for a, b in zip(before_cpu, before_dev):
        np.testing.assert_array_equal(a, b)
    for b, a, d in zip(before_cpu, after_cpu, after_dev):
        assert np.abs(a - b).max() > 1e-3  # the step moved the weights (noise 0.1/16 per unit)
        np.testing.assert_allclose(d, a, rtol=1e-5, atol=1e-6)


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
