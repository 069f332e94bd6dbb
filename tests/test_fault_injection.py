"""Kills at every step of a checkpoint save, kills at random moments, concurrent runs, corrupt checkpoints and
changed arguments on resume: a kill costs at most the steps since the last save, and nothing is silent."""
import errno
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from diffsynth.ops.files import temp_path
from diffsynth.training import build_parser, train
from diffsynth.training import trainer as trainer_module
from diffsynth.training.checkpoint import (read_checkpoint, read_newest_readable, recover, resolve_resume,
                                           resume_candidates, save_checkpoint)
from diffsynth.training.run_dir import FolderLock, OutputLocked, claim_output

class Killed(BaseException):
    """A simulated SIGKILL: a BaseException, so no `except Exception` clean-up runs on the way out."""


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


class FakeAccelerator:
    is_main_process, process_index, num_processes, distributed_type = True, 0, 1, "NO"

    def wait_for_everyone(self):
        pass


def save(root: Path, step: int, epoch: int, keep: int | None = 1) -> Path:
    p = torch.nn.Parameter(torch.full((4,), float(step)))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"step": step, "epoch": epoch, "batch": 0, "seed": 0}
    return save_checkpoint(FakeAccelerator(), root, step, {"w": p}, opt.state_dict(), sched, None, state, keep)


def kill_at(monkeypatch, n: int | None) -> list[str]:
    """Make the n-th (0-based) rename/replace/fsync raise Killed; returns the log of those calls."""
    calls = []
    for name in ("rename", "replace", "fsync"):
        def fake(*args, _real=getattr(os, name), _name=name):
            calls.append(_name)
            if len(calls) - 1 == n:
                raise Killed(_name)
            return _real(*args)
        monkeypatch.setattr(os, name, fake)
    return calls


# The file-system steps of a save (4 files: rng, trainable, optimizer, scheduler).
FIRST_SAVE = ["fsync"] * 4 + ["fsync", "replace", "fsync", "rename", "fsync", "fsync", "replace"]
REPLACING_SAVE = FIRST_SAVE[:7] + ["rename"] + FIRST_SAVE[7:]  # step-N moved aside first


def test_the_save_steps_are_the_ones_the_kill_tests_cover(tmp_path, monkeypatch):
    save(tmp_path, 1, 0)
    calls = kill_at(monkeypatch, None)
    save(tmp_path, 2, 0)
    assert calls == FIRST_SAVE
    calls.clear()
    save(tmp_path, 2, 1)
    assert calls == REPLACING_SAVE


@pytest.mark.parametrize("n", range(len(REPLACING_SAVE)))
def test_a_kill_anywhere_in_a_replacing_save_keeps_step_n(tmp_path, monkeypatch, n):
    """step-2 is saved twice (an epoch end): at any kill, step-2 comes back complete, with the new state once
    its temp folder was complete and the old one had been moved aside (the bug: `latest` named nothing)."""
    save(tmp_path, 1, 0)
    save(tmp_path, 2, 0)
    kill_at(monkeypatch, n)
    with pytest.raises(Killed):
        save(tmp_path, 2, 1)
    monkeypatch.undo()
    recover(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-2"]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "step-2"
    assert read_checkpoint(tmp_path / "step-2").state["epoch"] == (1 if n >= 8 else 0)


@pytest.mark.parametrize("n", range(len(FIRST_SAVE)))
def test_a_kill_anywhere_in_a_first_save_keeps_the_previous_step(tmp_path, monkeypatch, n):
    save(tmp_path, 1, 0)
    kill_at(monkeypatch, n)
    with pytest.raises(Killed):
        save(tmp_path, 2, 0)
    monkeypatch.undo()
    recover(tmp_path)
    # once its state.json is in (call 5), step-2 is complete and kept (renamed into place by `recover` if need
    # be), but `latest` names step-1 until it is replaced: that is the checkpoint a resume uses
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-1"] + (["step-2"] if n >= 6 else [])
    assert resolve_resume(tmp_path, "latest") == tmp_path / "step-1"
    assert read_checkpoint(tmp_path / "step-1").state["step"] == 1


def saver_child(ckpt: Path, report: int) -> None:
    """In a forked child (everything already imported): save forever, reporting each finished step."""
    try:
        for step in range(1, 10**6):
            save(ckpt, step, 0)
            save(ckpt, step, 1)  # the same step again: the replacing path
            os.write(report, f"{step}\n".encode())
    finally:
        os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("delay", [0.0, 0.004, 0.013])
def test_sigkill_at_a_random_moment_costs_at_most_the_steps_since_the_last_save(tmp_path, delay):
    ckpt = tmp_path / "checkpoints"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        saver_child(ckpt, write)
    os.close(write)
    with os.fdopen(read) as reports:
        done = [int(reports.readline()) for _ in range(3)]
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    recover(ckpt)
    path = resolve_resume(ckpt, "latest")
    assert read_checkpoint(path).state["step"] >= done[-1]
    assert [p for p in os.listdir(ckpt) if p.startswith(".") or ".tmp-" in p] == []


# ----------------------------------------------------------------------------- the output folder

def test_a_new_run_never_takes_over_another_runs_folder(tmp_path):
    (tmp_path / "epoch-0.safetensors").write_bytes(b"weights")
    half = temp_path(str(tmp_path / "epoch-1.safetensors"), 999)  # the other run was killed
    open(half, "wb").write(b"half")
    save(tmp_path / "checkpoints", 4, 0)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"already holds another run \(epoch-0.safetensors, checkpoints/latest, "
                                         r"checkpoints/step-4\); nothing was changed"):
        claim_output(tmp_path, resuming=False)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    lock, notes = claim_output(tmp_path, resuming=True)
    lock.close()
    assert notes == [f"removed temp file {os.path.basename(half)}"]


def test_a_second_run_in_a_locked_folder_stops_at_once(tmp_path):
    first = FolderLock(tmp_path)
    with pytest.raises(OutputLocked, match="is in use by another running training"):
        claim_output(tmp_path, resuming=True)
    first.close()
    lock, _ = claim_output(tmp_path, resuming=True)
    lock.close()


def test_output_path_that_is_a_file_fails_before_anything(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ValueError, match=r"--output_path .*out exists and is not a folder"):
        claim_output(tmp_path / "out", resuming=False)


def test_claim_repairs_an_interrupted_replacement_and_removes_temp_files(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 2, 0)
    os.rename(root / "step-2", root / ".old-step-2-999")  # killed between the two renames, temp not complete
    (root / ".tmp-step-2").mkdir()
    (root / ".tmp-step-3").mkdir()
    pointer, half = temp_path(str(root / "latest")), temp_path(str(tmp_path / "epoch-0.safetensors"), 999)
    open(pointer, "w").write("step-3")
    open(half, "wb").write(b"half")
    lock, notes = claim_output(tmp_path, resuming=True)
    lock.close()
    assert notes == ["restored step-2 from .old-step-2-999 (a save was interrupted)",
                     f"removed temp file {os.path.basename(pointer)}", f"removed temp file {os.path.basename(half)}"]
    assert sorted(os.listdir(root)) == ["latest", "step-2"] and os.listdir(tmp_path) == ["checkpoints"]


def test_latest_naming_a_folder_outside_checkpoints_is_refused(tmp_path):
    save(tmp_path, 1, 0)
    (tmp_path / "latest").write_text("../../elsewhere\n")
    with pytest.raises(ValueError, match=r"names '../../elsewhere', not a step-N folder"):
        resume_candidates(tmp_path, "latest")


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    save(tmp_path, 1, 0, keep=2)
    save(tmp_path, 2, 0, keep=2)
    weights = tmp_path / "step-2" / "trainable.safetensors"
    os.truncate(weights, os.path.getsize(weights) - 4)
    with pytest.warns(UserWarning, match=r"skipped damaged checkpoint\(s\), resuming from .*step-1: .*truncated"):
        saved = read_newest_readable(resume_candidates(tmp_path, "latest"))
    assert saved.path == tmp_path / "step-1" and saved.trainable["w"].tolist() == [1.0] * 4


def test_no_readable_checkpoint_is_an_error_naming_the_files(tmp_path):
    save(tmp_path, 1, 0)
    (tmp_path / "step-1" / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"no readable checkpoint to resume from: .*optimizer.pt: unreadable"):
        read_newest_readable(resume_candidates(tmp_path, "latest"))


# ----------------------------------------------------------------------------- training runs



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from PIL import Image
    root = tmp_path_factory.mktemp("data")
    for name, color in (("a.png", (200, 30, 30)), ("b.png", (30, 200, 30))):
        Image.new("RGB", (64, 64), color).save(root / name)
    (root / "metadata.csv").write_text("image,prompt\na.png,a red square\nb.png,a green square\n")
    (root / "one.csv").write_text("image,prompt\na.png,a red square\n")
    return root


def argv(tiny_root, data, out, *extra) -> list[str]:
    files = [str(tiny_root / f) for f in ("flux1-dev.safetensors", "text_encoder/model.safetensors",
                                          "text_encoder_2/", "ae.safetensors")]
    return ["--dataset_base_path", str(data), "--height", "32", "--width", "32", "--model_paths", json.dumps(files),
            "--output_path", str(out), "--t5_sequence_length", "8", "--seed", "0", "--report_to", "none",
            "--lora_base_model", "dit", "--lora_rank", "2", "--checkpointing_steps", "1", *extra]


def args(tiny_root, data, out, *extra):
    return build_parser().parse_args(argv(tiny_root, data, out, *extra))


def test_kill_between_the_renames_at_an_epoch_end_then_resume_latest(tiny_root, data, tmp_path, monkeypatch, capsys):
    """The reported loss: step-2 saved twice (after step 2, then at the epoch end); killed between renames."""
    calls, real = [], os.rename

    def rename(a, b):
        calls.append(b)
        if len(calls) == 4:  # step-1 in; step-2 in; epoch end: step-2 aside, [the new step-2 in]
            raise Killed()
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        train(args(tiny_root, data, tmp_path, "--cache_dir", str(tmp_path / "cache")))
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert not (root / "step-2").exists() and (root / "latest").read_text() == "step-2\n"
    result = train(args(tiny_root, data, tmp_path, "--cache_dir", str(tmp_path / "cache"), "--num_epochs", "2",
                        "--resume_from_checkpoint", "latest"))
    assert "note: restored step-2 from .tmp-step-2 (a save was interrupted)" in capsys.readouterr().out
    assert result["steps"] == 4 and len(result["losses"]) == 2  # epoch 1 only: nothing lost, nothing redone
    assert sorted(os.listdir(root)) == ["latest", "step-4"]


def test_resume_says_what_changed_and_the_command_line_wins(tiny_root, data, tmp_path, capsys):
    cache = ("--cache_dir", str(tmp_path / "cache"))
    train(args(tiny_root, data, tmp_path, *cache))
    trainer = trainer_module.Trainer(args(tiny_root, data, tmp_path, *cache, "--num_epochs", "3",
                                          "--learning_rate", "5e-4", "--dataset_metadata_path",
                                          str(data / "one.csv"), "--resume_from_checkpoint", "latest"))
    try:
        assert trainer.optimizer.param_groups[0]["lr"] == 5e-4 and trainer.scheduler.base_lrs == [5e-4]
        assert trainer.state == {**trainer.state, "step": 2, "epoch": 1, "batch": 0}
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert "warning: --learning_rate is 0.0005, the checkpoint was saved with 0.0001: 0.0005 is used from now on" in out
    assert "warning: the data changed since the checkpoint (rows 2 -> 1): epoch 1 restarts from its first batch" in out


def test_resume_with_another_lora_rank_is_refused_before_loading(tiny_root, data, tmp_path, monkeypatch):
    save(tmp_path / "checkpoints", 1, 0)
    state = tmp_path / "checkpoints" / "step-1" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "config": {"lora_rank": 4}}))
    monkeypatch.setattr(trainer_module, "load_pipeline", lambda *a: pytest.fail("models were loaded"))
    with pytest.raises(ValueError, match=r"it trains other tensors: --lora_rank 4 \(checkpoint\) vs 2 \(now\)"):
        train(args(tiny_root, data, tmp_path, "--resume_from_checkpoint", "latest"))


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tiny_root, data, tmp_path, capsys):
    """A re-run of the same command (a requeued job) succeeds and changes nothing."""
    cache = ("--cache_dir", str(tmp_path / "cache"))
    train(args(tiny_root, data, tmp_path, *cache))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = train(args(tiny_root, data, tmp_path, *cache, "--resume_from_checkpoint", "latest"))
    assert result["steps"] == 2 and result["files"] == []
    assert "is at step 2, the end of this run (2 steps: --num_epochs 1 x 2 steps/epoch, --max_steps), and every " \
           "file of it is written: nothing to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_nan_loss_stops_training_and_saves_nothing(tiny_root, data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.FluxTrainingModule, "forward",
                        lambda self, batch, generator=None: next(p for p in self.parameters() if p.requires_grad).sum()
                        * float("nan"))
    with pytest.raises(trainer_module.NonFiniteLoss, match=r"the loss is nan at step 1 \(metadata rows \[\d\]\);"
                                                           r".*not updated with it; no checkpoint was saved"):
        train(args(tiny_root, data, tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------- a kill after every file swap of a run

# The files a 2-step, 1-epoch run swaps into place (rename/replace), in order, with --checkpointing_steps 1 and its
# cache already built: the checkpoints of steps 1 and 2, the epoch's export, step-2 saved again at the epoch end.
RUN_SWAPS = ["state.json", "step-1", "latest", "state.json", "step-2", "latest", "epoch-0.safetensors",
             "state.json", ".old-step-2-PID", "step-2", "latest"]


def swaps_then_kill(monkeypatch, n: int | None) -> list[str]:
    """Let the n-th (0-based) rename/replace happen, then raise Killed; returns the names swapped in."""
    swapped = []
    for name in ("rename", "replace"):
        def fake(src, dst, _real=getattr(os, name)):
            _real(src, dst)
            swapped.append(os.path.basename(dst).replace(str(os.getpid()), "PID"))
            if len(swapped) - 1 == n:
                raise Killed()
        monkeypatch.setattr(os, name, fake)
    return swapped


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def finished_run(tiny_root, data, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run (its cache kept for the others): (cache folder, its epoch-0 export)."""
    from diffsynth.ops.files import load_state_dict
    out, cache = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("cache")
    train(args(tiny_root, data, out, "--cache_dir", str(cache)))
    reset_accelerate()
    return cache, load_state_dict(str(out / "epoch-0.safetensors"))


def test_the_run_swaps_are_the_ones_the_kill_tests_cover(tiny_root, data, tmp_path, monkeypatch, finished_run):
    swapped = swaps_then_kill(monkeypatch, None)
    train(args(tiny_root, data, tmp_path, "--cache_dir", str(finished_run[0])))
    assert swapped == RUN_SWAPS


@pytest.mark.parametrize("n", range(len(RUN_SWAPS)))
def test_a_kill_after_any_swap_then_resume_finishes_the_run(tiny_root, data, tmp_path, monkeypatch, capsys,
                                                            finished_run, n):
    """Killed after the n-th swap (including after the last step's checkpoint, before the export): resuming
    writes what the run owes and ends normally, with the weights of an uninterrupted run."""
    from diffsynth.ops.files import load_state_dict
    cache, reference = finished_run
    swaps_then_kill(monkeypatch, n)
    with pytest.raises(Killed):
        train(args(tiny_root, data, tmp_path, "--cache_dir", str(cache)))
    monkeypatch.undo()
    reset_accelerate()
    train(args(tiny_root, data, tmp_path, "--cache_dir", str(cache), "--resume_from_checkpoint", "latest"))
    if n in (5, 6):  # killed after step 2's checkpoint (latest names it), before the epoch-end checkpoint
        assert "is the last step of this run, which stopped before its end-of-run files were written: writing " \
               f"epoch-0.safetensors, the final checkpoint in {tmp_path}" in capsys.readouterr().out
    exported = load_state_dict(str(tmp_path / "epoch-0.safetensors"))
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-2"]
    assert read_checkpoint(root / "step-2").state["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "epoch-0.safetensors"]


# ----------------------------------------------------------------------------- Ctrl-C, a full disk

def test_ctrl_c_during_training_is_one_line_naming_the_newest_checkpoint(tiny_root, data, tmp_path, monkeypatch,
                                                                         capsys, finished_run):
    real = trainer_module.Trainer.after_step

    def after_step(self, step, loss, progress):
        real(self, step, loss, progress)
        if step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(trainer_module.Trainer, "after_step", after_step)
    command = argv(tiny_root, data, tmp_path, "--cache_dir", str(finished_run[0]), "--num_epochs", "2")
    assert trainer_module.main(command) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == ("stopped: interrupted at step 3: the newest checkpoint is step-3 (resume with "
                                    "--resume_from_checkpoint latest)")
    monkeypatch.undo()
    reset_accelerate()
    assert trainer_module.main(command + ["--resume_from_checkpoint", "latest"]) == 0
    assert read_checkpoint(tmp_path / "checkpoints" / "step-4").state["epoch"] == 2


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_so(tiny_root, data, tmp_path,
                                                                           monkeypatch, capsys, finished_run):
    from diffsynth.training import checkpoint
    real, calls = checkpoint.save_file, []

    def save_file(*args, **kwargs):  # step-1's checkpoint is written, step-2's finds the disk full
        calls.append(1)
        return (enospc if len(calls) == 2 else real)(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert trainer_module.main(argv(tiny_root, data, tmp_path, "--cache_dir", str(finished_run[0]))) == 1
    root = tmp_path / "checkpoints"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(rf"error: checkpoint step-2 not written: the disk of {re.escape(str(root))} is full "
                        r"\([\d,.]+ MiB free\); the newest checkpoint is step-1 \(resume with "
                        r"--resume_from_checkpoint latest\)", err.splitlines()[-1])
    assert sorted(os.listdir(root)) == ["latest", "step-1"]
    assert read_checkpoint(root / "step-1").state["step"] == 1


def test_a_full_disk_during_an_export_leaves_no_temp_file(tiny_root, data, tmp_path, monkeypatch, capsys,
                                                          finished_run):
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", enospc)  # the exports' writer (checkpoints keep theirs)
    assert trainer_module.main(argv(tiny_root, data, tmp_path, "--cache_dir", str(finished_run[0]))) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(rf"error: {re.escape(str(tmp_path / 'epoch-0.safetensors'))} not written: the disk of "
                        rf"{re.escape(str(tmp_path))} is full \([\d,.]+ MiB free\); the newest checkpoint is step-2 "
                        r"\(resume with --resume_from_checkpoint latest\)", err.splitlines()[-1])
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


# ----------------------------------------------------------------------------- the latent/text cache

def test_a_model_file_replaced_at_the_same_path_does_not_reuse_the_cache(tiny_root, data, tmp_path, capsys):
    """The replacement keeps the path, size, header layout and mtime (a `cp -p` of another checkpoint)."""
    import shutil
    import struct
    models = tmp_path / "models"
    shutil.copytree(tiny_root, models)
    cache = ("--cache_dir", str(tmp_path / "cache"))
    train(args(models, data, tmp_path / "one", *cache))
    reset_accelerate()
    vae = models / "ae.safetensors"
    before = os.stat(vae)
    with open(vae, "r+b") as f:  # the lowest mantissa bits of the first weight in the data section
        (header,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header)
        low = f.read(1)[0]
        f.seek(8 + header)
        f.write(bytes([low ^ 1]))
    os.utime(vae, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(vae) == before.st_size and os.stat(vae).st_mtime_ns == before.st_mtime_ns
    train(args(models, data, tmp_path / "two", *cache))
    out = capsys.readouterr().out
    assert "latent/text cache: 2 rows" in out and out.count("(2 new on rank 0)") == 2
