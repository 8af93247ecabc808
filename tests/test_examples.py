"""The examples run end to end (their --smoke mode) and report what they claim."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relative):
    spec = importlib.util.spec_from_file_location(
        relative.replace("/", "_")[:-3], os.path.join(ROOT, relative)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_main_job_smoke(capsys):
    pytest.importorskip("sklearn")
    accuracy = _load("examples/quickstart.py").main(["--smoke", "--seed", "0"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("digits DP-SGD: test accuracy")
    assert 0.0 <= accuracy <= 1.0


def _last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


# The tutorial fits arrays, as TF Privacy's does: the library warns that they are not Poisson.
@pytest.mark.filterwarnings(r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled")
def test_tf_privacy_tutorial_smoke(capsys, mnist_path):
    result = _load("examples/tf_privacy_mnist_tutorial.py").main(
        ["--smoke", "--seed", "0", "--data", mnist_path]
    )
    out = capsys.readouterr().out
    assert "satisfies differential privacy with eps" in out
    assert out.strip().splitlines()[-1].startswith("tf_privacy_mnist_tutorial: test accuracy")
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["epsilon_prv"] < result["epsilon_rdp"]


@pytest.mark.parametrize("model", ["scatternet", "cnn"])
def test_mnist_best_smoke(capsys, model, mnist_path):
    result = _load("examples/mnist_best.py").main(
        ["--smoke", "--seed", "0", "--data", mnist_path, "--epsilon", "3", "--model", model]
    )
    line = _last_line(capsys)
    assert line.startswith("mnist_best: test accuracy") and f"model={model}" in line
    assert result["epsilon"] <= 3.0 + 1e-9  # the calibrated run never overspends


def test_dp_keras_config_smoke(capsys, mnist_path):
    result = _load("examples/dp_keras_config.py").main(
        ["--smoke", "--seed", "0", "--data", mnist_path]
    )
    assert _last_line(capsys).startswith("dp_keras_config: test accuracy")
    assert result["epsilon"] <= result["budget"] + 1e-9
    assert result["refused_past_budget"]


def test_private_dataframe_smoke(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("pandas")
    result = _load("examples/private_dataframe.py").main(["--smoke", "--seed", "0"])
    assert _last_line(capsys).startswith("private_dataframe: test accuracy")
    assert list(result["predictions"].columns) == ["result"] and result["index_ok"]
    assert 0 < result["epsilon"] < float("inf")


def test_lipschitz_mnist_smoke(capsys, mnist_path):
    result = _load("examples/lipschitz_mnist.py").main(
        ["--smoke", "--seed", "0", "--data", mnist_path, "--epsilon", "8"]
    )
    assert _last_line(capsys).startswith("lipschitz_mnist: test accuracy")
    assert result["epsilon"] <= 8.0 + 1e-9 and result["ratio"] > 0


@pytest.mark.parametrize(
    "script",
    [
        "quickstart.py",
        "tf_privacy_mnist_tutorial.py",
        "mnist_best.py",
        "dp_keras_config.py",
        "private_dataframe.py",
        "lipschitz_mnist.py",
        "lipdp_tutorial.py",
    ],
)
def test_examples_have_help(script):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "--smoke" in out


def test_step_time_benchmark_runs(capsys, mnist_path):
    bench = _load("benches/bench_step_time.py")
    summary = bench.main(
        ["--steps", "2", "--warmup", "1", "--batch-size", "8", "--data", mnist_path]
    )
    assert summary["DPSequential (auto)"][0] > 0 and summary["DPSequential (auto)"][1] > 0
    assert "DPSequential (vmap)" in capsys.readouterr().out


def test_transformer_benchmark_runs(capsys):
    bench = _load("benches/bench_transformer.py")
    summary = bench.main(
        ["--vocab", "50", "--length", "8", "--batch-size", "4", "--steps", "2", "--warmup", "1"]
    )
    assert summary["DPModel (auto)"][0] > 0
    assert "DPModel (auto)" in capsys.readouterr().out


def test_memory_benchmark_runs(capsys):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak-RSS reset needs Linux /proc")
    bench = _load("benches/bench_memory.py")
    summary = bench.main(["--batch-size", "8", "--features", "16", "--width", "32", "--steps", "1"])
    assert summary["DPSequential (auto)"][0] > 0
    assert "peak memory" in capsys.readouterr().out


def test_opacus_benchmark_runs(capsys, mnist_path):
    pytest.importorskip("opacus")
    bench = _load("benches/bench_opacus.py")
    summary = bench.main(
        ["--steps", "2", "--warmup", "1", "--batch-size", "8", "--data", mnist_path]
    )
    assert summary["ours / fastest Opacus"][1] > 0


def test_fused_ops_benchmark_runs(capsys):
    bench = _load("benches/bench_fused_ops.py")
    summary = bench.main(
        ["--min-log2-p", "8", "--max-log2-p", "9", "--rounds", "1", "--warmup", "0"]
        + ["--batch-size", "8", "--skip-end-to-end"]
    )
    assert summary["clipped_sum"]["256"]["torch"] > 0
    assert "noise of 2^9 values" in capsys.readouterr().out


def test_fused_ops_contention_sweep_runs():
    from torchdp_keras import ops

    if not ops.extension_info()["cpu"]:
        pytest.skip("the fused CPU kernel is not built")
    bench = _load("benches/bench_fused_ops.py")
    rows = bench.contention_sweep([10], [1], rounds=1, warmup=0)
    assert set(rows) == {"quiet/threads=1/P=2^10", "busy/threads=1/P=2^10"}
    assert all(row["ratio"] > 0 and row["batch"] == 256 for row in rows.values())


def test_distributed_mnist_smoke_under_torchrun(mnist_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        os.path.join(ROOT, "examples", "distributed_mnist.py"),
        "--smoke",
        "--seed",
        "0",
        "--data",
        mnist_path,
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, KERAS_BACKEND="torch"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("distributed_mnist:"))
    assert "2 process(es)" in line and "epsilon" in line


def test_accountant_benchmark_dense_mode_runs(capsys):
    # numpy/scipy only (the comparison mode needs the bench extras)
    bench = _load("benches/bench_accountants.py")
    summary = bench.dense(None, points=[(1e-3, 1.0, 10, 1e-6), (0.5, 4.0, 1, 1e-3)])
    assert summary["certified"] == 2
    assert "2 of 2 points certified" in capsys.readouterr().out


def test_secure_mode_benchmark_runs(capsys, mnist_path):
    bench = _load("benches/bench_secure_mode.py")
    summary = bench.main(
        [
            "--steps",
            "2",
            "--warmup",
            "1",
            "--params",
            "4096",
            "--data",
            mnist_path,
            "--max-ratio",
            "1000",
        ]
    )
    assert summary["tutorial_cnn"]["secure_mode=True"][0] > 0
    assert "ns per value" in capsys.readouterr().out


def test_zoo_benchmark_runs(capsys):
    bench = _load("benches/bench_zoo.py")
    summary = bench.main(["--only", "tutorial", "--steps", "1", "--warmup", "0"])
    row = summary["tutorial"]
    assert row["engine"] == "fast" and row["dp_ms"] > 0 and row["plain_ms"] > 0
    assert "subclass/DPSequential" in capsys.readouterr().out


def test_keras_hub_lora_smoke(capsys):
    pytest.importorskip("keras_hub")
    result = _load("examples/keras_hub_lora.py").main(["--smoke", "--seed", "0"])
    assert _last_line(capsys).startswith("keras_hub_lora: held-out loss")
    assert result["engine"] == "fast" and result["slow_layers"] == ()
    assert 0 < result["epsilon"] < float("inf")
