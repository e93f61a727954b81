import torch

from realfake_ray import devices


def test_a_gpu_ray_assigned_but_torch_cannot_see_runs_on_cpu_and_says_so_once(monkeypatch, capsys):
    """Fake autoscaling nodes advertise {"GPU": 1}: Ray sets CUDA_VISIBLE_DEVICES, torch finds no device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(devices, "_warned", False)
    assert devices.torch_device() == torch.device("cpu")
    assert devices.torch_device() == torch.device("cpu")
    assert capsys.readouterr().out.count("Ray assigned GPU 0 to this process but torch sees no CUDA device") == 1


def test_a_visible_gpu_is_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.torch_device() == torch.device("cuda")
