"""The rate-limited namespace cluster of ``experiments.bench_cluster``: a tiny real run (as root),
teardown on every exit path, and the arithmetic of the balance rate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

MODULE = "experiments.bench_cluster"


def _no_cluster_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "bench_cluster needs root (it creates network namespaces, veths, a bridge and tc qdiscs)"
    if shutil.which("ip") is None or shutil.which("tc") is None or shutil.which("taskset") is None:
        return "bench_cluster needs iproute2 (ip, tc) and taskset"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=30).returncode != 0:
        return "`ip netns` is unavailable here"
    return None


needs_cluster = pytest.mark.skipif(_no_cluster_reason() is not None, reason=_no_cluster_reason() or "")


def _prefix(tag: str) -> str:
    return f"t{tag}{os.getpid() % 100000}"  # ≤ 8 characters, unique to this test process


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _remaining(prefix: str) -> list[str]:
    """Namespaces, links and /etc/netns dirs whose names start with ``<prefix>-``."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout.split()
    links = [line.split(":")[1].strip().split("@")[0]
             for line in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout.splitlines()
             if line.count(":") >= 2]
    etc = os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []
    return [name for name in [*netns, *links, *etc] if name.startswith(f"{prefix}-")]


def _cleanup(prefix: str) -> None:
    """Best-effort removal after a failed test, so one failure does not leave state behind."""
    for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout.split():
        if ns.startswith(f"{prefix}-"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    for name in _remaining(prefix):
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


@needs_cluster
def test_tiny_run_reports_json_and_tears_down(tmp_path, cifar_npz):
    prefix = _prefix("r")
    # Leftovers of a "killed earlier run" with the same prefix: the setup must clear them first.
    subprocess.run(["ip", "netns", "add", f"{prefix}-ns0"], check=True, timeout=30)
    subprocess.run(["ip", "link", "add", f"{prefix}-br", "type", "bridge"], check=True, timeout=30)
    os.makedirs(f"/etc/netns/{prefix}-ns7", exist_ok=True)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", MODULE, "--width", "0.0625", "--batch-size", "8", "--steps", "2", "--warmup", "1",
             "--modes", "pufferfish,signum", "--rate", "1gbit", "--prefix", prefix, "--data", str(cifar_npz),
             "--compile-cache", str(tmp_path / "cache"), "--timeout", "240"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert set(result) == {"rate", "processes", "modes"}
        assert result["rate"] == "1gbit" and result["processes"] == 2
        assert set(result["modes"]) == {"pufferfish", "signum"}  # signum: a packed-bit all-gather over gloo
        for r in result["modes"].values():
            assert set(r) == {"step_s", "bytes_per_step", "compute_s", "comm_alone_s", "overlap"}
            assert r["step_s"] > 0 and r["compute_s"] > 0 and r["comm_alone_s"] > 0 and 0 <= r["overlap"] <= 1
            assert isinstance(r["bytes_per_step"], int) and r["bytes_per_step"] > 0
        assert result["modes"]["signum"]["bytes_per_step"] < result["modes"]["pufferfish"]["bytes_per_step"] / 8
        assert "pufferfish" in proc.stdout and "speedup" in proc.stdout  # the table
        assert _remaining(prefix) == []
    finally:
        _cleanup(prefix)


@needs_cluster
def test_sigterm_tears_down(cifar_npz):
    prefix = _prefix("s")
    proc = subprocess.Popen(
        [sys.executable, "-m", MODULE, "--width", "0.0625", "--batch-size", "8", "--steps", "2", "--modes", "vanilla",
         "--prefix", prefix, "--data", str(cifar_npz), "--compile-cache", "none"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(n.startswith(f"{prefix}-ns1") for n in _remaining(prefix)):  # setup under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        time.sleep(2)  # workers starting
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "SIGTERM" in err
        assert _remaining(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _cleanup(prefix)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop privileges")
def test_without_root_exits_2():
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", MODULE],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "needs root" in proc.stderr and proc.stderr.count("\n") == 1


def test_rate_parsing_and_balance_fit():
    import argparse

    from experiments.bench_cluster import balance_rate, format_rate, rate_bps

    assert rate_bps("1gbit") == 1e9 and rate_bps("250mbit") == 2.5e8 and rate_bps("10mbps") == 8e7
    assert format_rate(1e9) == "1gbit" and format_rate(2.5e8) == "250mbit" and format_rate(81_234_567) == "81235kbit"
    for bad in ("1foo", "0mbit", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            rate_bps(bad)

    bits, latency, compute = 44.7e6 * 8, 0.2, 4.6

    def probe(rate: float) -> dict:
        return {"rate": format_rate(rate), "processes": 2,
                "modes": {"vanilla": {"step_s": compute + latency + bits / rate, "compute_s": compute, "bytes_per_step": 1}}}

    fit = balance_rate([probe(1e9), probe(2.5e8)])
    assert fit["latency_s"] == pytest.approx(latency) and fit["wire_bytes"] == pytest.approx(bits / 8, rel=1e-6)
    assert fit["balance_bps"] == pytest.approx(bits / (compute - latency), rel=1e-6)


def test_balance_fit_falls_back_when_noise_breaks_it():
    from experiments.bench_cluster import balance_rate

    # comm barely changes between the two rates (noise): the fit would give a negative or huge latency.
    probes = [{"rate": "1gbit", "processes": 2, "modes": {"vanilla": {"step_s": 5.0, "compute_s": 4.0, "comm_paired_s": 1.0, "bytes_per_step": 1}}},
              {"rate": "250mbit", "processes": 2, "modes": {"vanilla": {"step_s": 5.0, "compute_s": 4.0, "comm_paired_s": 0.9, "bytes_per_step": 1}}}]
    fit = balance_rate(probes)
    assert fit["latency_s"] == 0 and fit["method"].startswith("two-rate fit failed")
    assert fit["balance_bps"] == round(2.5e8 * 0.9 / 4.0)
