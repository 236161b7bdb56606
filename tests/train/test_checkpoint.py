"""Checkpoints: round trip with RNG states, fallback past damaged files, failed writes, refused pickles."""
from __future__ import annotations

import errno
import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from train import checkpoint
from train.checkpoint import CheckpointError, load_latest, rng_state, save_checkpoint, set_rng_state


def _state(value: float) -> dict:
    return {"model": {"weight": torch.full((3, 3), value)}, "epoch": int(value), "rng": rng_state()}


def test_round_trip_restores_weights_and_every_rng(tmp_path: Path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path, 7, _state(1.5))
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = load_latest(tmp_path)
    set_rng_state(loaded["rng"])
    assert torch.equal(loaded["model"]["weight"], torch.full((3, 3), 1.5)) and loaded["epoch"] == 1
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(2), expected[2])


def test_keeps_the_newest_two_verified_checkpoints(tmp_path: Path):
    for step in range(4):
        save_checkpoint(tmp_path, step, _state(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step0000000002.pt", "step0000000002.sha256", "step0000000003.pt", "step0000000003.sha256"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:100] + b"\x00" * 8 + p.read_bytes()[108:]), "is corrupted"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, caplog, damage, message):
    save_checkpoint(tmp_path, 1, _state(1.0))
    save_checkpoint(tmp_path, 2, _state(2.0))
    damage(tmp_path / "step0000000002.pt")
    loaded = load_latest(tmp_path)
    assert loaded["epoch"] == 1
    assert message in caplog.text and "falling back to the previous checkpoint" in caplog.text


def test_all_checkpoints_damaged_is_an_error_that_says_what_to_do(tmp_path: Path):
    save_checkpoint(tmp_path, 1, _state(1.0))
    (tmp_path / "step0000000001.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint .*1 committed, all damaged.* fix: delete"):
        load_latest(tmp_path)


def _killed_before_the_sidecar(monkeypatch) -> None:
    """Make the next save die like ``kill -9`` between the .pt and its .sha256 (the second atomic write)."""
    real_write = checkpoint.atomic_write

    def write(path: Path, writer) -> None:
        if path.suffix == ".sha256":
            raise SystemExit("killed")  # nothing after this point of save_checkpoint runs
        real_write(path, writer)
    monkeypatch.setattr(checkpoint, "atomic_write", write)


def test_an_interrupted_first_checkpoint_is_not_damage_the_stage_starts_over(tmp_path: Path, monkeypatch, caplog):
    _killed_before_the_sidecar(monkeypatch)
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path, 5, _state(5.0))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000000005.pt"]  # written, never committed
    assert load_latest(tmp_path) is None  # no checkpoint: the stage restarts, instead of "all damaged"
    assert "its write was interrupted before it was committed" in caplog.text
    save_checkpoint(tmp_path, 5, _state(5.5))  # the restarted stage reaches the same step again
    assert load_latest(tmp_path)["model"]["weight"][0, 0] == 5.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000000005.pt", "step0000000005.sha256"]


def test_an_interrupted_later_checkpoint_falls_back_and_is_cleaned_up_by_the_next_save(tmp_path: Path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1.0))
    _killed_before_the_sidecar(monkeypatch)
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path, 2, _state(2.0))
    monkeypatch.undo()
    (tmp_path / ".step0000000003.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # killed inside a write
    assert load_latest(tmp_path)["epoch"] == 1
    save_checkpoint(tmp_path, 3, _state(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step0000000001.pt", "step0000000001.sha256", "step0000000003.pt", "step0000000003.sha256"]


def test_resaving_a_step_never_pairs_the_new_file_with_the_old_sidecar(tmp_path: Path, monkeypatch):
    """A save of a step that has a committed checkpoint, killed between its two files, leaves an uncommitted
    file: the old sidecar must not vouch for different bytes (they would read as damage, or worse, match)."""
    save_checkpoint(tmp_path, 1, _state(1.0))
    save_checkpoint(tmp_path, 2, _state(2.0))
    _killed_before_the_sidecar(monkeypatch)
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path, 2, _state(7.0))
    monkeypatch.undo()
    assert not (tmp_path / "step0000000002.sha256").exists()
    assert load_latest(tmp_path)["epoch"] == 1


@pytest.mark.parametrize("where", ["model.bn.running_var", "optimizer.state.0.momentum_buffer"])
def test_a_state_with_nan_or_inf_anywhere_is_not_a_checkpoint(tmp_path: Path, where):
    """The loss can stay finite while batch-norm statistics overflow: the guard must look at every tensor."""
    save_checkpoint(tmp_path, 1, _state(1.0))
    state = _state(2.0)
    state["model"]["bn.running_var"] = torch.tensor([1.0, float("inf")])
    state["optimizer"] = {"state": {0: {"momentum_buffer": torch.tensor([float("nan")])}}}
    if where.startswith("model"):
        state["optimizer"]["state"][0]["momentum_buffer"].zero_()
    else:
        state["model"]["bn.running_var"].fill_(1.0)
    with pytest.raises(checkpoint.NonFiniteStateError, match=rf"after step 2 holds NaN/inf in {where}; it was not "
                                                             r"saved and the last good checkpoint is kept ; fix: lower"):
        save_checkpoint(tmp_path, 2, state)
    assert load_latest(tmp_path)["epoch"] == 1 and not (tmp_path / "step0000000002.pt").exists()


def test_integer_and_rng_tensors_are_not_checked_for_finiteness():
    assert checkpoint.nonfinite_tensors({"rng": rng_state(), "mask": torch.zeros(3, dtype=torch.bool),
                                         "w": [torch.ones(2), (torch.tensor([float("-inf")]),)]}) == ["w.1.0"]


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1.0))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)  # the disk fills up while the new checkpoint is flushed
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        save_checkpoint(tmp_path, 2, _state(2.0))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing half-written left behind
    assert load_latest(tmp_path)["epoch"] == 1


def _commit(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` with a matching sidecar, bypassing save_checkpoint (which adds format_version)."""
    torch.save(state, path)
    data = path.read_bytes()
    path.with_suffix(".sha256").write_text(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")


def test_a_checkpoint_records_its_format_version_and_one_without_it_reads_as_version_1(tmp_path: Path):
    save_checkpoint(tmp_path, 1, _state(1.0))
    assert load_latest(tmp_path)["format_version"] == checkpoint.FORMAT_VERSION == 1
    _commit(tmp_path / checkpoint.checkpoint_name(2), _state(2.0))
    loaded = load_latest(tmp_path)
    assert loaded["epoch"] == 2 and "format_version" not in loaded


def test_a_checkpoint_of_an_unknown_format_version_is_refused_not_skipped_as_damage(tmp_path: Path):
    save_checkpoint(tmp_path, 1, _state(1.0))
    _commit(tmp_path / checkpoint.checkpoint_name(2), {**_state(2.0), "format_version": 2})
    with pytest.raises(checkpoint.CheckpointVersionError,
                       match=r"has format_version 2; this micronet-kit reads version 1 ; fix: resume it with the "
                             r"micronet-kit version that wrote it"):
        load_latest(tmp_path)


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_malicious_pickle_is_refused_and_runs_no_code(tmp_path: Path, caplog):
    stage = tmp_path / "checkpoints" / "0_train"
    save_checkpoint(stage, 1, _state(1.0))
    marker = tmp_path / "pwned"
    planted = stage / checkpoint.checkpoint_name(99)
    torch.save({"model": _RunsCode(marker)}, planted)
    # The attacker also writes a matching checksum: the sidecar alone must not be what protects us.
    data = planted.read_bytes()
    planted.with_suffix(".sha256").write_text(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")

    loaded = load_latest(stage)
    assert not marker.exists()
    assert loaded["epoch"] == 1
    assert "weights_only=True" in caplog.text
    torch.load(planted, weights_only=False)  # control: the payload does run code when unpickled
    assert marker.exists()


def test_corrupted_write_is_caught_and_older_good_checkpoints_survive(tmp_path: Path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1.0))
    save_checkpoint(tmp_path, 2, _state(2.0))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write = checkpoint.atomic_write

    def silently_corrupting(path: Path, write) -> None:
        """The write succeeds, but one byte of the checkpoint lands on disk wrong (sidecars land intact)."""
        real_write(path, write)
        if path.suffix == ".pt":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
    monkeypatch.setattr(checkpoint, "atomic_write", silently_corrupting)
    with pytest.raises(CheckpointError, match="read back differs .* previous checkpoints are intact ; fix: check"):
        save_checkpoint(tmp_path, 3, _state(3.0))
    monkeypatch.undo()
    # Both older good checkpoints are kept (the keep policy did not count the corrupt one), and it is gone.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_latest(tmp_path)["epoch"] == 2


def _fake_cuda(monkeypatch, available: bool, count: int) -> list[tuple[int, torch.Tensor]]:
    """Pretend this CPU machine has ``count`` CUDA devices; return the list of (device, state) restored."""
    restored: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    return restored


@pytest.mark.parametrize("saved, available, count, restored_devices, dropped", [
    (4, True, 2, [0, 1], "CUDA RNG states of 4 devices and this machine has 2: restoring the first 2, dropping the other 2"),
    (8, False, 0, [], "CUDA RNG states of 8 devices and this machine has 0: restoring the first 0, dropping the other 8"),
    (1, True, 2, [0], None),  # fewer saved than present: the rest keep their seeded state, nothing to say
    (2, True, 2, [0, 1], None),
])
def test_cuda_rng_states_are_restored_only_for_devices_that_exist(monkeypatch, caplog, saved, available, count,
                                                                  restored_devices, dropped):
    state = rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(saved)]  # one distinct state per device
    restored = _fake_cuda(monkeypatch, available, count)
    set_rng_state(state)
    assert [device for device, _ in restored] == restored_devices
    assert all(torch.equal(s, state["cuda"][device]) for device, s in restored)  # each device gets its own state
    if dropped:
        assert dropped in caplog.text
    else:
        assert "CUDA RNG states" not in caplog.text
