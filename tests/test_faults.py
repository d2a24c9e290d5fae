"""Fault injection: a crash at every point of a checkpoint's replacement and of pruning, a corrupt
newest checkpoint, two runs on one output folder, runaway non-finite steps, SIGTERM, an output
folder that is a file. After each, nothing done is lost and a resumed run continues the curve."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from angelptm.distributed.mesh import listening
from angelptm.distributed.spawn import free_port
from angelptm.errors import UserError
from angelptm.train import checkpoint as ckpt
from angelptm.train.faults import TrainingStopped, collective_failure
from angelptm.train.trainer import Trainer

from conftest import REPO, cli_command, one_line, run_cli, start_cli, tiny_config as tiny, tiny_sections
from test_trainer import fit, losses, records, refused, step_folders

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(BaseException):
    """Stands for SIGKILL at one point of a save: nothing after it runs (not even `except Exception`)."""


def crash_at(monkeypatch, module, name: str, call: int) -> None:
    """Make the `call`-th call (0-based) of module.name on a checkpoint folder die, after the calls
    before it did their work (`os` is one module: other writers' calls pass through uncounted)."""
    real, calls = getattr(module, name), []

    def dying(*args, **kwargs):
        if "checkpoints" not in str(args[0]):
            return real(*args, **kwargs)
        calls.append(args)
        if len(calls) - 1 == call:
            raise Killed(name, args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


def fit_dying(cfg) -> None:
    with pytest.raises(Killed):
        fit(cfg)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """Losses of an uninterrupted 6-step run, for every interrupted one to match."""
    out = tmp_path_factory.mktemp("straight") / "run"
    fit(tiny(out, train={"steps": 6}))
    return losses(out)


def complete_checkpoints(out: Path) -> list[str]:
    """The step_<N> folders of a run, each checked complete (read_train_state raises otherwise)."""
    names = [name for name in step_folders(out) if name.startswith("step_")]
    for name in names:
        ckpt.read_train_state(out / "checkpoints" / name)
    return names


@pytest.mark.parametrize("operation", ["replace", "rmtree"])
def test_a_kill_at_any_rename_or_delete_of_a_save_loses_nothing(tmp_path, monkeypatch, straight, operation):
    """Resumed from step_2 into a folder that already holds step_4 (and prunes step_2 after), the run
    replaces step_4. Killed at each rename or deletion of that save in turn, the folder still holds
    complete checkpoints only, and the next start resumes on the uninterrupted curve."""
    base = tmp_path / "base"
    fit(tiny(base, train={"steps": 4, "ckpt_every": 2}))
    module = ckpt.os if operation == "replace" else ckpt.shutil
    for call in range(20):
        out = tmp_path / f"killed_{call}"
        shutil.copytree(base, out)
        crash_at(monkeypatch, module, operation, call)
        try:
            fit(tiny(out, train={"steps": 4, "ckpt_every": 2, "resume": str(out / "checkpoints" / "step_2")}))
            killed = False
        except Killed:
            killed = True
        monkeypatch.undo()
        assert "step_4" in complete_checkpoints(out) or (out / "checkpoints" / ".replaced_step_4").is_dir(), call
        trainer = fit(tiny(out, train={"steps": 6, "ckpt_every": 2}))
        assert step_folders(out) == ["step_4", "step_6"], call  # keep_checkpoints=2; no leftovers
        assert losses(out) == straight and trainer.step == 6, call
        if not killed:  # the save ran to its end: every one of its calls has been a kill point
            break
    assert call > 1, "the save made too few renames or deletions to have tested it"


def test_resume_auto_falls_back_to_the_newest_complete_checkpoint(tmp_path, straight, capfd):
    out = tmp_path / "run"
    fit(tiny(out, train={"steps": 4, "ckpt_every": 2}))
    (out / "checkpoints" / "step_4" / "train_state.json").unlink()
    trainer = fit(tiny(out, train={"steps": 6, "ckpt_every": 2}))
    err = capfd.readouterr().err
    assert "warning: skipped" in err and "step_4" in err and "resumed from" in err and "step_2" in err
    assert losses(out) == straight and trainer.step == 6


def refusal(cfg) -> str:
    """The one-line UserError that building a Trainer for `cfg` raises."""
    with pytest.raises(UserError) as excinfo:
        try:
            Trainer(cfg)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return one_line(str(excinfo.value))


def test_a_second_run_on_the_same_output_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from angelptm.train.faults import OutputLock; "
         f"OutputLock({str(out)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = refusal(tiny(out))
        assert f"pid {holder.pid}" in message and "train.output_dir" in message
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the holder's; nothing of ours
    finally:
        holder.communicate("")
    fit(tiny(out, train={"steps": 2}))  # the holder is gone, so is its lock


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_an_output_dir_that_is_a_file_is_refused(tmp_path, where):
    (tmp_path / "f").write_text("not a folder")
    out = tmp_path / "f" if where == "is-a-file" else tmp_path / "f" / "run"
    message = refusal(tiny(out))
    assert "train.output_dir" in message and "file" in message
    assert (tmp_path / "f").read_text() == "not a folder"


def test_a_refused_run_takes_back_the_folders_it_made(tmp_path):
    """The lock is taken before the resume point is checked; a refusal there removes it again."""
    message = refused(tiny(tmp_path / "a" / "b" / "run", train={"resume": str(tmp_path / "nope")}))
    assert "train.resume" in message and not (tmp_path / "a").exists()


def test_runaway_skipped_steps_stop_the_run(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped) as excinfo:
        fit(tiny(out, optim={"lr": 1e6, "warmup_steps": 0}, train={"steps": 40, "max_skipped_steps": 4}))
    message = one_line(str(excinfo.value))
    assert "train.max_skipped_steps=4" in message and excinfo.value.exit_code == 3
    skipped = [r["step"] for r in records(out) if r["skipped"]]
    assert len(skipped) == 4 and skipped == list(range(skipped[0], skipped[0] + 4))
    assert records(out)[-1]["step"] == skipped[-1] < 40


def cli_args(output_dir, **sections) -> list[str]:
    """`--set` arguments that give the CLI the tiny config of conftest, with `sections` applied."""
    raw = tiny_sections(output_dir, **sections)
    return [arg for name, values in raw.items() for key, value in values.items()
            for arg in ("--set", f"{name}.{key}={value}")]


def test_non_finite_weights_are_never_saved(tmp_path):
    """An update so large that the weights overflow, from finite gradients: the save refuses."""
    out = tmp_path / "run"
    result = run_cli("train", *cli_args(out, optim={"lr": 3e38, "warmup_steps": 0}, train={"steps": 3, "ckpt_every": 1}))
    assert result.returncode == 3, result.stderr
    assert one_line(result.stderr.splitlines()[-1]).startswith("angelptm: error: the weights are not finite")
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tmp_path):
    """What SLURM and Kubernetes send before a kill: the run stops at the end of the step it is in,
    with a checkpoint there, and the resumed run has the uninterrupted run's losses."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    long_run = {"train": {"steps": 10_000}}
    proc = start_cli("train", *cli_args(out, **long_run))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert time.monotonic() - signalled < 30
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert "SIGTERM" in stderr and step_folders(out) == [f"step_{last}"]
    ckpt.read_train_state(out / "checkpoints" / f"step_{last}")

    resumed = Trainer(tiny(out, **long_run))
    resumed.fit(until=last + 2)
    uninterrupted = Trainer(tiny(straight, **long_run))
    uninterrupted.fit(until=last + 2)
    dist.destroy_process_group()
    assert losses(out) == losses(straight) and len(losses(out)) == last + 2


# ---------------------------------------------------------------------------------------------
# A stalled, dead or orphaned rank under torchrun


def children(pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers whose parent is `pid`."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), None)
        if ppid == pid and rank is not None:
            workers[int(rank)] = int(entry.name)
    return workers


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_torchrun(out: Path, *overrides: str, steps: int = 100_000, launcher: tuple[str, ...] = (),
                   logged: int = 2) -> subprocess.Popen:
    """torchrun with 2 workers on the tiny config, once `logged` steps are in metrics.jsonl."""
    argv, env = cli_command("train", *cli_args(out, train={"steps": steps, "micro_batch": 4}), *overrides)
    argv = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()), "--nproc_per_node", "2",
            *launcher, *argv[1:]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    metrics = out / "metrics.jsonl"
    assert wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= logged, 120), "no training"
    return proc


def test_a_collective_failure_is_named_by_what_happened():
    refused = "Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: Connection refused"
    assert "could not connect to a peer" in collective_failure(RuntimeError(refused), 600)
    stalled = "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv operation to complete"
    assert "waited longer than parallel.timeout_s=3 s" in collective_failure(RuntimeError(stalled), 3)
    closed = "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"
    assert "lost its connection to a peer" in collective_failure(RuntimeError(closed), 3)
    assert collective_failure(ValueError("shapes (4, 8) and (3, 8) do not match"), 3) is None


@pytest.mark.slow
def test_a_stalled_rank_ends_every_rank_with_one_line_after_the_timeout(tmp_path):
    proc = start_torchrun(tmp_path / "run", "--set", "parallel.timeout_s=3")
    workers = children(proc.pid)
    os.kill(workers[1], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        assert wait_until(lambda: not alive(workers[0]), 60), "rank 0 still waits"
        assert time.monotonic() - stopped < 30
    finally:
        os.kill(workers[1], signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith("angelptm: error:")]
    assert proc.returncode != 0
    assert any(line.startswith("angelptm: error: rank 0: ") and "parallel.timeout_s=3 s" in line for line in lines), \
        stderr[-3000:]


@pytest.mark.slow
def test_a_dead_rank_is_named_in_one_line_by_the_others(tmp_path):
    proc = start_torchrun(tmp_path / "run")
    os.kill(children(proc.pid)[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith("angelptm: error:")]
    assert proc.returncode != 0 and "[rank0]: Traceback" not in stderr, stderr[-3000:]
    assert lines and all(line.startswith("angelptm: error: rank 0: ") for line in lines), stderr[-3000:]


@pytest.mark.slow
def test_workers_die_with_their_launcher_after_a_checkpoint(tmp_path):
    """torchrun killed outright: its workers get SIGTERM from the kernel, finish the step, checkpoint
    and exit, instead of training on as orphans."""
    out = tmp_path / "run"
    proc = start_torchrun(out)
    workers = children(proc.pid)
    proc.kill()
    proc.communicate(timeout=60)
    assert wait_until(lambda: not any(alive(pid) for pid in workers.values()), 60), "orphans still run"
    names = complete_checkpoints(out)
    assert len(names) == 1
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert names == [f"step_{last}"]


@pytest.mark.slow
def test_torchrun_restarts_a_job_whose_rank_died_and_it_resumes_the_same_curve(tmp_path):
    """`torchrun --max-restarts 1`: a rank killed outright, the others stop with exit 4, torchrun
    starts the job again, and it resumes from the newest checkpoint with the losses the first
    attempt had logged after it."""
    out = tmp_path / "run"
    proc = start_torchrun(out, "--set", "train.ckpt_every=5", steps=30, launcher=("--max-restarts", "1"), logged=8)
    first_attempt = records(out)
    os.kill(children(proc.pid)[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert re.search(r"resumed from \S+step_(5|10|15) at step", stderr), stderr[-3000:]
    final = records(out)
    assert [r["step"] for r in final] == list(range(1, 31))
    assert [r["loss"] for r in final[: len(first_attempt)]] == [r["loss"] for r in first_attempt]


@pytest.mark.slow
def test_a_two_node_job_survives_the_death_of_a_node(tmp_path):
    """Two torchrun "nodes" meeting over c10d rendezvous, one worker each. Node 1 dies outright
    (agent and worker killed), then comes back: node 0's worker stops with exit 4, its agent
    restarts it, the two meet again and resume from the newest checkpoint on the same curve.
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as the README says: with torchrun's shared store a
    node that rejoins as a new agent waits forever for the rendezvous' bootstrap address."""
    out, port = tmp_path / "run", free_port()
    argv, env = cli_command("train", *cli_args(out, train={"steps": 30, "micro_batch": 4, "ckpt_every": 5}))
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"

    def start_node() -> subprocess.Popen:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job",
                    "--max-restarts", "1"]
        return subprocess.Popen(launcher + argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=REPO, start_new_session=True)

    node0 = start_node()  # first, so that it hosts the rendezvous and outlives node 1
    assert wait_until(lambda: listening("127.0.0.1", port), 60)
    node1 = start_node()
    metrics = out / "metrics.jsonl"
    assert wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 8, 120), "no training"
    first_attempt = records(out)
    workers = children(node1.pid)
    os.kill(node1.pid, signal.SIGSTOP)  # the agent must not see its worker die and react
    for pid in workers.values():
        os.kill(pid, signal.SIGKILL)
    node1.kill()
    node1.communicate()
    node1 = start_node()
    _, stderr1 = node1.communicate(timeout=240)
    _, stderr0 = node0.communicate(timeout=60)
    assert node0.returncode == 0 and node1.returncode == 0, stderr0[-3000:] + stderr1[-3000:]
    assert re.search(r"resumed from \S+step_(5|10|15) at step", stderr0), stderr0[-3000:]
    final = records(out)
    assert [r["step"] for r in final] == list(range(1, 31))
    assert [r["loss"] for r in final[: len(first_attempt)]] == [r["loss"] for r in first_attempt]


# ---------------------------------------------------------------------------------------------
# A full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system: room for one checkpoint of the tiny model, not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: a failed run's lock may stay open


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(small_disk):
    out = small_disk / "run"
    with pytest.raises(TrainingStopped) as excinfo:
        fit(tiny(out, train={"steps": 6, "ckpt_every": 2}))
    message = one_line(str(excinfo.value))
    assert message.startswith(f"no space for checkpoint {out / 'checkpoints' / 'step_4'}: it needs ")
    assert "MiB are free" in message
    assert complete_checkpoints(out) == ["step_2"] and step_folders(out) == ["step_2"]


def test_a_disk_that_fills_during_a_save_leaves_older_checkpoints_intact(small_disk, monkeypatch):
    """The free-space check passes (another writer fills the disk after it): the write fails with
    ENOSPC, its partial folder is removed, and the run stops in one line."""
    out = small_disk / "run"
    fit(tiny(out, train={"steps": 2, "ckpt_every": 2}))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 2**19))  # leaves half a MiB
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 0, 2**40))
    with pytest.raises(TrainingStopped) as excinfo:
        fit(tiny(out, train={"steps": 4, "ckpt_every": 2}))
    assert one_line(str(excinfo.value)).startswith("no space for checkpoint")
    assert step_folders(out) == ["step_2"] and complete_checkpoints(out) == ["step_2"]
    assert not (out / "checkpoints" / ".tmp_step_4").exists()  # the partial save gave its space back
