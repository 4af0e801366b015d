"""What every experiment's command line shares: user errors as one sentence and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence


class UsageError(Exception):
    """A problem with the user's input; reported as one sentence, exit code 2, nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one sentence (no usage dump) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def rank_ratio_arg(text: str) -> float:
    """argparse type for ``--ranks``: a number in (0, 1]."""
    from pufferfish_jax.ranks import validate_rank_ratio

    try:
        return validate_rank_ratio(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_out_dir(path: str, resume: bool = True) -> bool:
    """The output directory must be creatable and writable. Returns True when it holds
    checkpoints to continue from; a run there without checkpoints, or checkpoints with
    ``resume=False``, is refused (never silently overwritten or started over)."""
    from pufferfish_jax.checkpoint import checkpoint_dir, committed_steps

    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {path} is not writable")
    if committed_steps(checkpoint_dir(path)):
        if not resume:
            raise UsageError(f"output directory {path} holds checkpoints of a run and --no-resume forbids continuing it; "
                             "choose another --out-dir")
        return True
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        raise UsageError(f"output directory {path} already holds a run without a usable checkpoint; choose another --out-dir")
    return False


def check_resumable(path: str, identity: dict, epochs: int) -> None:
    """The newest checkpoint in ``path`` must be readable, belong to a run like this one
    (:func:`pufferfish_jax.train.trainer.run_identity`) and not be past ``epochs``. Reads metadata only."""
    from pufferfish_jax.checkpoint import checkpoint_dir, identity_mismatch, latest_meta

    found = latest_meta(checkpoint_dir(path))
    if found is None:
        raise UsageError(f"output directory {path} holds checkpoints but none is readable; move it away to start over")
    _, meta = found
    why = identity_mismatch(meta["identity"], identity)
    if why:
        raise UsageError(f"output directory {path} holds checkpoints of another run ({why}); "
                         "resume it with the same settings or choose another --out-dir")
    if meta["epoch"] > epochs:
        raise UsageError(f"output directory {path} holds a checkpoint from epoch {meta['epoch']}, past --epochs {epochs}")


# -- the flags and the run every training command shares ---------------------------------------

DTYPES = ("float32", "bfloat16")


def add_run_args(parser: argparse.ArgumentParser, *, epochs: int, warmup_epochs: int, batch_size: int,
                 ranks: float = 0.25, save_every_note: str = "") -> None:
    """Adds the flags of every training command (the task's recipe gives the defaults): rank
    ratio, epochs, warm-up, batch, seed, compute dtype, output, checkpoints, data parallelism."""
    p = parser
    p.add_argument("--ranks", type=rank_ratio_arg, default=ranks,
                   help="rank ratio in (0, 1]: r = int(min(fan_in, fan_out) * ratio); 1.0 trains the vanilla model")
    p.add_argument("--epochs", type=int, default=epochs, help="total epochs")
    p.add_argument("--warmup-epochs", type=int, default=warmup_epochs,
                   help="vanilla epochs before the SVD switch; 0 = low-rank from scratch")
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype; parameters, optimizer state, loss and BN statistics stay float32")
    p.add_argument("--out-dir", default=None, help="where metrics.jsonl, summary.json and checkpoints go "
                   "(default runs/<task>-<time>); one that holds checkpoints is resumed")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--save-every", type=int, default=0,
                   help="also save every N steps (0: at epoch ends, the switch and SIGTERM only)" + save_every_note)
    c.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints")
    c.add_argument("--no-resume", action="store_true", help="refuse to run on an --out-dir that holds checkpoints instead of resuming")
    g = p.add_argument_group("data parallelism")
    g.add_argument("--reducer", default="allreduce", help="gradient reducer: allreduce (one flat buffer), allreduce-per-tensor, powersgd or signum")
    g.add_argument("--powersgd-rank", type=int, default=None, help="PowerSGD rank (default 2 for vanilla, 4 with Pufferfish)")
    g.add_argument("--signum-momentum", type=float, default=0.9, help="Signum's momentum (applied before the sign)")
    g.add_argument("--devices", type=int, default=None, help="split this host's CPU into N XLA devices (testing data parallelism)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0 for a multi-process run")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run (with --coordinator)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index (with --coordinator)")
    g.add_argument("--multi-host", action="store_true", help="auto-detect the cluster (TPU pod slice, SLURM, Open MPI)")
    g.add_argument("--peer-timeout", type=int, default=60,
                   help="seconds after which a multi-process run whose peer stopped answering exits with an error")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--dry-run", action="store_true", help="build both models, print parameters and gradient bytes, train nothing")


def validate_run_args(args: argparse.Namespace) -> None:
    """:class:`UsageError` for shared flags that cannot work together."""
    from pufferfish_jax.reducers import REDUCERS

    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise UsageError(f"--warmup-epochs ({args.warmup_epochs}) must be between 0 and --epochs ({args.epochs})")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.reducer not in REDUCERS:
        raise UsageError(f"unknown reducer {args.reducer!r}; choose one of: {', '.join(REDUCERS)}")
    if args.powersgd_rank is not None and args.powersgd_rank < 1:
        raise UsageError(f"--powersgd-rank must be at least 1, got {args.powersgd_rank}")
    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices must be at least 1, got {args.devices}")
    if args.coordinator is not None and (args.num_processes is None or args.process_id is None):
        raise UsageError("--coordinator needs --num-processes and --process-id")
    if args.num_processes is not None and args.process_id is not None and not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    if args.save_every < 0:
        raise UsageError(f"--save-every must be 0 or more steps, got {args.save_every}")
    if args.keep_checkpoints < 1:
        raise UsageError(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    if args.peer_timeout < 1:
        raise UsageError(f"--peer-timeout must be at least 1 second, got {args.peer_timeout}")
    if args.max_steps_per_epoch is not None and args.max_steps_per_epoch < 1:
        raise UsageError(f"--max-steps-per-epoch must be at least 1, got {args.max_steps_per_epoch}")


def compute_dtype(args: argparse.Namespace):
    """``--dtype`` as a JAX dtype."""
    import jax.numpy as jnp

    return jnp.dtype(args.dtype)


def powersgd_rank(args: argparse.Namespace) -> int:
    """PowerSGD's rank: the flag, else as the official scripts (2 for vanilla, 4 with Pufferfish)."""
    return args.powersgd_rank or (4 if args.ranks < 1.0 else 2)


def make_reducer(args: argparse.Namespace):
    """The reducer the flags ask for."""
    from pufferfish_jax.reducers import get_reducer

    if args.reducer == "powersgd":
        return get_reducer("powersgd", rank=powersgd_rank(args))
    if args.reducer == "signum":
        return get_reducer("signum", momentum=args.signum_momentum)
    return get_reducer(args.reducer)


def reducer_identity(args: argparse.Namespace) -> str:
    """The reducer and its options, as a checkpoint must match them to be resumed."""
    return {"powersgd": f"powersgd rank {powersgd_rank(args)}",
            "signum": f"signum momentum {args.signum_momentum:g}"}.get(args.reducer, args.reducer)


def print_dry_run(report: dict, rows: Sequence[tuple[str, str]]) -> dict:
    """The ``--dry-run`` table (vanilla, Pufferfish, ratio) for each ``(key, label)`` in ``rows``
    — ``report`` holds ``<key>_vanilla`` and ``<key>_pufferfish`` — then ``report`` as one JSON line."""
    import json

    print(f"{'':24s}{'vanilla':>14s}{'pufferfish':>14s}{'ratio':>8s}")
    for key, label in rows:
        v, p = report[f"{key}_vanilla"], report[f"{key}_pufferfish"]
        print(f"{label:24s}{v:>14,d}{p:>14,d}{v / p:>7.2f}x")
    print(json.dumps(report))
    return report


def report_done(args: argparse.Namespace, what: str, results: str, summary: dict) -> dict:
    """The closing line every command prints (what ran, its results, parameters, time, where
    the logs are), then the summary as one JSON line; returns the summary."""
    import json

    s = summary
    print(f"done: {what} ranks {args.ranks:g}, {s['epochs']} epochs ({s['warmup_epochs']} warm-up): {results}, "
          f"params {s['params_vanilla']:,} -> {s['params_final']:,}, {s['total_s']:.0f}s; logs in {args.out_dir}")
    print(json.dumps(s))
    return s


def time_train_steps(exp, seed: int, ranks: float, batch: dict, lr: float, steps: int) -> dict[str, tuple[int, list[float]]]:
    """``--bench-steps``: the project's own train step (``make_train_step``, exact all-reduce, the
    task's carry) of the vanilla model and of its Pufferfish form (SVD of the same weights), on one
    fixed host ``batch``, timed interleaved so that load from other processes hits both alike.
    Returns ``{"vanilla" | "pufferfish": (trainable params, step seconds)}``; the first two rounds
    (compilation, warm-up) are not timed."""
    import time

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pufferfish_jax import count_params, factorize
    from pufferfish_jax.parallel import data_mesh, global_batch, place_state
    from pufferfish_jax.reducers import all_reduce
    from pufferfish_jax.train.state import init_state, split_model
    from pufferfish_jax.train.steps import make_train_step
    from pufferfish_jax.train.trainer import initial_carry

    mesh, tx, reducer = data_mesh(), exp.make_tx(), all_reduce()
    batch = global_batch(batch, mesh)
    rows = next(iter(batch.values())).shape[0]
    lr = jnp.asarray(lr, jnp.float32)
    runs = {}
    for name in ("vanilla", "pufferfish"):
        model = exp.build_model(nnx.Rngs(seed))
        if name == "pufferfish":
            factorize(model, ranks, exp.keep_full_rank)
        train_def, _, params, rest = split_model(model)
        state = place_state(init_state(params, rest, tx, reducer, mesh.size), mesh)
        runs[name] = [make_train_step(train_def, exp.loss_fn, tx, reducer, mesh),
                      state.replace(carry=initial_carry(exp, rows, mesh)), count_params(model), []]
    for i in range(steps + 2):
        for run in runs.values():
            t0 = time.perf_counter()
            run[1], metrics = run[0](run[1], batch, lr)
            jax.block_until_ready((run[1], metrics))
            if i >= 2:
                run[3].append(time.perf_counter() - t0)
    return {name: (run[2], run[3]) for name, run in runs.items()}


def default_out_dir(args: argparse.Namespace, name: str) -> str:
    import time

    return args.out_dir or os.path.join("runs", f"{name}-r{args.ranks:g}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run(args: argparse.Namespace, task: str, identity: dict, run_name: str | None = None):
    """Everything that can fail on the user's input, before anything is written: the output
    directory (default ``runs/<run_name or task>-r<ranks>-<time>``), the devices and processes,
    the reducer and the run configuration. Returns ``(cfg, reducer, mesh)``; raises :class:`UsageError`."""
    args.out_dir = default_out_dir(args, run_name or task)
    resuming = check_out_dir(args.out_dir, resume=not args.no_resume)
    from pufferfish_jax import distributed
    from pufferfish_jax.parallel import check_batch_divisible, data_mesh

    if args.devices:
        distributed.set_host_devices(args.devices)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.multi_host,
                           heartbeat_timeout_s=args.peer_timeout)
    mesh = data_mesh()
    try:
        check_batch_divisible(args.batch_size, mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from pufferfish_jax.train.trainer import TrainConfig, run_identity

    reducer = make_reducer(args)
    cfg = TrainConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                      rank_ratio=args.ranks, seed=args.seed, out_dir=args.out_dir,
                      progress=not args.no_progress, max_steps_per_epoch=args.max_steps_per_epoch,
                      save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, resume=not args.no_resume,
                      identity={"task": task, "dtype": args.dtype, "reducer_options": reducer_identity(args), **identity},
                      config=vars(args))
    if resuming:
        check_resumable(args.out_dir, run_identity(cfg, reducer, mesh), args.epochs)
    return cfg, reducer, mesh


def run_training(experiment, cfg, reducer, mesh):
    """``fit`` with the exit codes every command shares: 0 done (or stopped by SIGTERM after
    saving), 2 a checkpoint that cannot be used, 3 NaN/Inf, 1 a lost peer process.
    Returns the :class:`~pufferfish_jax.train.trainer.FitResult`."""
    import jax

    from pufferfish_jax.checkpoint import CheckpointError
    from pufferfish_jax.train.trainer import NonFiniteError, Preempted, fit

    try:
        return fit(experiment, cfg, reducer=reducer, mesh=mesh)
    except Preempted as e:
        print(e, flush=True)
        raise SystemExit(0)
    except CheckpointError as e:  # every checkpoint damaged, or another run's
        fail(str(e))
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3)
    except Exception as e:
        if jax.process_count() > 1:
            # A collective failed: almost always a peer that died. Leave now rather than wait in
            # jax.distributed's shutdown barrier for a process that will never come.
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            print(f"error: process {jax.process_index()} of {jax.process_count()} stops because the run lost a peer "
                  f"process or a collective failed ({first}); rerun every process with the same command to resume "
                  "from the last checkpoint", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        raise
