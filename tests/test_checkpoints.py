"""realfake_ray._internal.checkpoints: the newest complete checkpoint folder, pruning, the planned restore (no Ray cluster)."""

import io

import pytest
import ray.train
import torch
from safetensors.torch import save

from realfake_ray import storage
from realfake_ray._internal.checkpoints import checkpoint_number, newest_complete, prune_checkpoints, resume_checkpoint
from realfake_ray._internal.trainer import RestoreFromDriver


def _checkpoint(root, step: int, truncate: str | None = None) -> str:
    folder = storage.join(str(root), f"checkpoint_{step:08d}")
    state = io.BytesIO()
    torch.save({"step": step, "rng": [torch.zeros(3)]}, state)
    files = {"state.pt": state.getvalue(), "lora.safetensors": save({"w": torch.ones(4, 4)}), "metrics.json": b"[]"}
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data[: len(data) // 2] if name == truncate else data)
    return folder


def test_newest_complete_skips_half_copied_folders(tmp_path):
    required = ("state.pt", "lora.safetensors", "metrics.json")
    assert newest_complete(str(tmp_path / "absent"), "checkpoint_", required) is None
    ok = _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8, truncate="state.pt")  # a kill during the copy: torch.load fails
    _checkpoint(tmp_path, 12, truncate="lora.safetensors")
    storage.makedirs(storage.join(str(tmp_path), "checkpoint_00000016"))  # the copy had only just begun
    storage.makedirs(storage.join(str(tmp_path), "checkpoint_notes"))  # not a checkpoint name
    assert newest_complete(str(tmp_path), "checkpoint_", required) == ok
    assert newest_complete(str(tmp_path), "checkpoint_", ("state.pt",)) == storage.join(str(tmp_path), "checkpoint_00000012")
    assert checkpoint_number(ok, "checkpoint_") == 4 and checkpoint_number(ok + "/", "checkpoint_") == 4
    assert checkpoint_number(str(tmp_path / "epoch_0003"), "checkpoint_") is None


def test_prune_keeps_the_newest_numbered_folders_only(tmp_path):
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    storage.makedirs(storage.join(str(tmp_path), "checkpoint_notes"))
    deleted = prune_checkpoints(str(tmp_path), "checkpoint_", 2)
    assert [checkpoint_number(url, "checkpoint_") for url in deleted] == [2, 4]
    assert sorted(name for name, _ in storage.listdir(str(tmp_path))) == ["checkpoint_00000006", "checkpoint_00000008",
                                                                        "checkpoint_notes"]
    assert prune_checkpoints(str(tmp_path / "absent"), "checkpoint_", 2) == []


def test_a_worker_restored_beyond_the_planned_checkpoint_refuses(monkeypatch, tmp_path):
    planned = str(tmp_path / "run" / "checkpoint_00000004")
    registered = {"value": None}
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: registered["value"])
    assert resume_checkpoint(None, "checkpoint_") is None  # a fresh start
    assert resume_checkpoint(planned, "checkpoint_").path.endswith("checkpoint_00000004")
    registered["value"] = ray.train.Checkpoint(str(tmp_path / "run" / "checkpoint_00000002"))
    assert resume_checkpoint(planned, "checkpoint_").path.endswith("checkpoint_00000004")  # Ray's snapshot lags
    registered["value"] = ray.train.Checkpoint(str(tmp_path / "run" / "checkpoint_00000006"))
    with pytest.raises(RestoreFromDriver, match="checkpoint_00000006"):
        resume_checkpoint(planned, "checkpoint_")  # Ray Train restarted the group: its datasets are planned for 4
    with pytest.raises(RestoreFromDriver):
        resume_checkpoint(None, "checkpoint_")
