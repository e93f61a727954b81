import subprocess
import sys

import pytest

from realfake_ray.cli import main


def test_print_config_resolves_preset_and_overrides(capsys):
    assert main(["encode", "--preset", "tiny", "--out", "/tmp/x", "--set", "encode.batch_size=3", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "batch_size: 3" in text and "pretrained: preset:tiny" in text and "out: /tmp/x" in text


def test_config_error_is_one_clear_line_and_exit_2(capsys):
    assert main(["encode", "--preset", "tiny", "--set", "encode.resolution=abc"]) == 2
    err = capsys.readouterr().err
    assert "encode.resolution" in err and "'abc'" in err and "Traceback" not in err


def test_missing_data_is_reported_before_work(capsys, tmp_path):
    assert main(["encode", "--out", str(tmp_path)]) == 2
    assert "data.train" in capsys.readouterr().err


def test_preset_command_writes_a_stock_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    assert main(["preset", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "tiny"))
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_module_entry_point_is_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "realfake_ray", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "encode" in result.stdout


@pytest.mark.parametrize(("job", "flag"), [("caption", "--data"), ("encode", "--data"), ("finetune", "--max-steps"), ("generate", "--mult"),
                                           ("train", "--source"), ("evaluate", "--val-data"),
                                           ("scale_in1k", "--only")])
def test_job_scripts_forward_to_the_cli(job, flag):
    result = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--preset" in result.stdout and flag in result.stdout


def test_verbose_flag_reaches_the_ray_section(capsys):
    assert main(["encode", "--preset", "tiny", "--print-config"]) == 0
    assert "verbose: false" in capsys.readouterr().out
    assert main(["encode", "--preset", "tiny", "--verbose", "--print-config"]) == 0
    assert "verbose: true" in capsys.readouterr().out


def test_a_library_error_keeps_its_traceback_ours_is_one_line(monkeypatch, capsys):
    import torch

    def torch_fails(cfg):
        return torch.zeros(2) + torch.zeros(3)  # RuntimeError raised inside torch

    monkeypatch.setattr("realfake_ray.stages.encode.driver.run_encode", torch_fails)
    with pytest.raises(RuntimeError, match="size of tensor"):
        main(["encode", "--preset", "tiny"])

    def ours(cfg):
        from realfake_ray.config import load_config

        load_config(preset="tiny", overrides=["generate.steps=0"])  # raises ConfigError in realfake_ray

    monkeypatch.setattr("realfake_ray.stages.encode.driver.run_encode", ours)
    assert main(["encode", "--preset", "tiny"]) == 2
    assert "generate.steps" in capsys.readouterr().err
