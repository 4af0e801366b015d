"""``python -m experiments.cifar``: a real end-to-end run, the dry run, and every bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_module

TINY = ["--width", "0.0625", "--batch-size", "32", "--no-progress"]


def test_end_to_end_warmup_transition_low_rank(tmp_path, cifar_npz):
    out = tmp_path / "run"
    proc = run_module("experiments.cifar", "--data", str(cifar_npz), *TINY, "--epochs", "3", "--warmup-epochs", "1",
                      "--max-steps-per-epoch", "4", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r and "phase" in r]
    assert [r["phase"] for r in epochs] == ["warmup", "low_rank", "low_rank"]
    transition = [r for r in records if r.get("event") == "transition"]
    assert len(transition) == 1 and transition[0]["epoch"] == 1
    assert epochs[1]["params"] < epochs[0]["params"]  # the switch really shrank the model
    for r in epochs:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_loss"] > 0 and r["lr"] == 0.1
        assert r["step"] == 4 * r["epoch"]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["params_final"] == epochs[-1]["params"]
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    assert json.loads((out / "config.json").read_text())["warmup_epochs"] == 1


def test_dry_run_json_has_paper_counts():
    proc = run_module("experiments.cifar", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["params_vanilla"] == 11_173_962 and report["params_pufferfish"] == 3_336_266
    assert report["grad_bytes_vanilla"] == 4 * 11_173_962 and report["grad_bytes_pufferfish"] == 4 * 3_336_266
    assert abs(report["macs_vanilla"] / 0.5565e9 - 1) < 0.005 and abs(report["macs_pufferfish"] / 0.2173e9 - 1) < 0.01


def _bad(main, argv, capsys, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert not out.exists()  # nothing written
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ranks", "0"], "rank ratio"),
        (["--ranks", "-0.5"], "rank ratio"),
        (["--ranks", "1.5"], "rank ratio"),
        (["--ranks", "abc"], "rank ratio"),
        (["--arch", "resnet9000"], "unknown arch"),
        (["--epochs", "5", "--warmup-epochs", "6"], "--warmup-epochs"),
        (["--data", "/nonexistent/cifar.npz"], "does not exist"),
        (["--batch-size", "0"], "--batch-size"),
        (["--reducer", "carrier-pigeon"], "unknown reducer"),
        (["--reducer", "powersgd", "--powersgd-rank", "0"], "--powersgd-rank"),
        (["--coordinator", "127.0.0.1:1234"], "--num-processes"),
    ],
)
def test_bad_input_is_one_sentence_exit_2(argv, message, capsys, tmp_path):
    from experiments.cifar import main

    assert message in _bad(main, argv, capsys, tmp_path)


def test_malformed_data_file(capsys, tmp_path):
    from experiments.cifar import main

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    assert "not a readable" in _bad(main, ["--data", str(bad)], capsys, tmp_path)


def test_existing_run_is_not_overwritten(capsys, tmp_path, cifar_npz):
    from experiments.cifar import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(cifar_npz), "--out-dir", str(out)])
    assert exc.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_help_documents_flags():
    proc = run_module("experiments.cifar", "--help")
    assert proc.returncode == 0
    for flag in ("--ranks", "--warmup-epochs", "--width", "--data", "--dry-run", "--out-dir", "--seed"):
        assert flag in proc.stdout


def test_two_devices_powersgd_reports_communication(tmp_path, cifar_npz):
    out = tmp_path / "run"
    proc = run_module("experiments.cifar", "--data", str(cifar_npz), *TINY, "--epochs", "2", "--warmup-epochs", "1",
                      "--max-steps-per-epoch", "3", "--devices", "2", "--reducer", "powersgd", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"phase"' in l]
    assert all(r["devices"] == 2 and r["reducer"] == "powersgd" for r in epochs)
    # Pufferfish shrinks what PowerSGD still sends; the split into compute and communication is reported.
    assert epochs[1]["bytes_per_step"] < epochs[0]["bytes_per_step"]
    # Timings, not ordering: on a loaded host the two medians can land either way.
    assert all(r["step_s"] > 0 and r["compute_s"] > 0 and r["comm_s"] >= 0 for r in epochs)


def test_batch_not_divisible_by_devices(tmp_path, cifar_npz):
    out = tmp_path / "run"
    proc = run_module("experiments.cifar", "--data", str(cifar_npz), *TINY, "--batch-size", "30", "--devices", "4",
                      "--out-dir", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: batch size 30 is not divisible by the 4 devices"
    assert not out.exists()
