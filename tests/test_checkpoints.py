"""realfake_ray._internal.checkpoints: finding the newest complete checkpoint folder (no Ray)."""

import io

import torch
from safetensors.torch import save

from realfake_ray import storage
from realfake_ray._internal.checkpoints import checkpoint_number, newest_complete


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
