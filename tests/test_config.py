import pytest
import yaml

from realfake_ray.config import ConfigError, build_config, RunConfig, dump_config, load_config, parse_override, read_yaml_config


def test_defaults_are_the_paper_recipe():
    cfg = RunConfig()
    assert cfg.finetune.lora_rank == 4 and cfg.finetune.mmd_weight == 0.003 and cfg.finetune.snr_gamma == 5.0
    assert (cfg.generate.strength, cfg.generate.steps, cfg.generate.guidance_scale) == (0.75, 30, 2.0)
    assert cfg.generate.scheduler == "unipc" and cfg.generate.lora_scale == 0.5
    assert cfg.train.arch == "resnet50" and cfg.train.weight_decay == 5e-4


def test_a_generate_recipe_bundles_sampler_values_beneath_explicit_keys():
    tuned = load_config(overrides=["generate.recipe=tiny-tuned"]).generate
    assert (tuned.scheduler, tuned.steps, tuned.guidance_scale, tuned.speedup) == ("euler", 8, 1.0, "deepcache:3")
    assert (tuned.strength, tuned.lora_scale) == (0.5, 0.5)  # the LoRA scale is the paper's
    assert load_config(overrides=["generate.recipe=tiny-tuned", "generate.steps=12"]).generate.steps == 12
    paper = load_config(overrides=["generate.recipe=paper"]).generate
    assert paper == RunConfig().generate  # the field defaults are the paper recipe
    tiny, tiny_paper = (load_config(preset="tiny", overrides=o).generate for o in ([], ["generate.recipe=paper"]))
    assert tiny.recipe == "tiny-tuned" and (tiny.steps, tiny.strength) == (8, 0.5)
    assert (tiny_paper.scheduler, tiny_paper.steps, tiny_paper.strength, tiny_paper.guidance_scale) == ("unipc", 30, 0.75, 2.0)
    with pytest.raises(ConfigError, match=r"generate\.recipe: Input should be 'paper' or 'tiny-tuned' \(got 'fast'\)"):
        load_config(overrides=["generate.recipe=fast"])
    # the resolved values are what a dumped config holds: it reloads to the same sampler
    cfg = load_config(overrides=["generate.recipe=tiny-tuned"])
    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_preset_then_yaml_then_flags_then_set(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("encode:\n  batch_size: 7\n  rows_per_file: 9\nseed: 3\n")
    cfg = load_config(
        preset="tiny", config_file=str(yaml_file), overrides=["encode.rows_per_file=11"], seed=5, out="/tmp/x"
    )
    assert cfg.encode.resolution == 32  # preset
    assert cfg.encode.batch_size == 7  # yaml over preset
    assert cfg.seed == 5  # flag over yaml
    assert cfg.encode.rows_per_file == 11  # --set over yaml
    assert cfg.model.pretrained == "preset:tiny"
    assert cfg.data.train == "embedded:digits/train" and cfg.data.val == "embedded:digits/val"


def test_user_data_replaces_embedded_default():
    cfg = load_config(preset="tiny", data__train="s3://bucket/train")
    assert cfg.data.train == "s3://bucket/train" and cfg.data.val is None


def test_typo_key_is_named():
    with pytest.raises(ConfigError, match=r"encode\.bach_size: unknown key \(got 3\); did you mean 'batch_size'\?") as err:
        load_config(overrides=["encode.bach_size=3"])
    assert "allowed: resolution, batch_size, rows_per_file" in str(err.value)
    with pytest.raises(ConfigError, match=r"encode\.actors\.max: unknown key.*allowed: min_size, max_size"):
        load_config(overrides=["encode.actors.max=3"])
    with pytest.raises(ConfigError, match=r"sed: unknown key.*did you mean 'seed'"):
        load_config(overrides=["sed=3"])


def test_impossible_value_names_field_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["generate.strength=1.5"])
    assert "generate.strength" in str(err.value) and "1.5" in str(err.value)


def test_literal_value_lists_allowed():
    with pytest.raises(ConfigError, match="generate.scheduler.*'unipc'"):
        load_config(overrides=["generate.scheduler=heun"])


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="huge")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("encode.batch_size")


def test_actor_pool_order_checked():
    with pytest.raises(ConfigError, match="max_size"):
        load_config(overrides=["encode.actors.min_size=4", "encode.actors.max_size=2"])


def test_missing_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_yaml_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml_config(str(bad))


def test_require_data():
    with pytest.raises(ConfigError, match="data.train"):
        RunConfig().require_data()


def test_dump_round_trip(tmp_path):
    cfg = load_config(preset="tiny", out="memory://r", overrides=["generate.mult=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(config_file=str(path))
    assert again == cfg


def test_relative_local_paths_are_anchored_where_the_config_is_made(tmp_path, monkeypatch):
    """Ray workers run in other directories: every plain local path becomes absolute on the driver."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd").mkdir(parents=True)
    cfg = load_config(
        out="runs/demo", data__train="data/train", overrides=["model.pretrained=models/sd", "train.synthetic=syn/train",
                                                             "evaluate.extra_sets={sketch: sets/sketch}"],
    )
    assert cfg.out == str(tmp_path / "runs" / "demo") and cfg.data.train == str(tmp_path / "data" / "train")
    assert cfg.model.pretrained == str(tmp_path / "models" / "sd") and cfg.train.synthetic == str(tmp_path / "syn" / "train")
    assert cfg.evaluate.extra_sets == {"sketch": str(tmp_path / "sets" / "sketch")}
    remote = load_config(out="s3://bucket/run", preset="tiny")
    assert remote.out == "s3://bucket/run" and remote.data.train == "embedded:digits/train"
    assert remote.model.pretrained == "preset:tiny" and RunConfig().model.pretrained.startswith("stable-diffusion-v1-5/")
    assert load_config(out=cfg.out).out == cfg.out  # anchoring is idempotent


@pytest.mark.parametrize("address", ["ray://10.255.255.1:10001", "10.255.255.1:6379"])
def test_a_relative_out_on_a_remote_cluster_is_refused(monkeypatch, address):
    """Workers on other machines would write below their own working directories: refuse, naming both."""
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match=rf"out='runs/x' is a relative local path, but Ray runs on a remote cluster \({address}\)"):
        load_config(preset="tiny", out="runs/x")
    for out in ("s3://bucket/run", "/shared/run"):  # storage every node reaches: fine
        assert load_config(preset="tiny", out=out).out == out


def test_a_relative_out_on_this_machine_is_anchored(monkeypatch):
    for address in ("127.0.0.1:6379", "auto", "ray://localhost:10001"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert load_config(preset="tiny", out="runs/x").out.endswith("/runs/x")


@pytest.mark.parametrize("key,new", [("finetune.guidance", "finetune.vision_token"), ("generate.guidance", "generate.vision_token"),
                                     ("generate.accelerator", "generate.speedup"),
                                     ("generate.negative_guidance_token", "generate.negative_vision_token"),
                                     ("encode.caption", "caption.enabled"), ("encode.captioner", "caption.model"),
                                     ("encode.caption_max_tokens", "caption.max_tokens"),
                                     ("encode.caption_batch_size", "caption.batch_size")])
def test_a_renamed_key_is_refused_naming_its_new_name(key, new):
    with pytest.raises(ConfigError, match=rf"{key}: this key was renamed .*\({new}\)"):
        load_config(preset="tiny", overrides=[f"{key}=none"])


def test_a_renamed_key_is_refused_as_a_sampler_tuning_axis_too():
    with pytest.raises(ConfigError, match=r"tune_sampler.axes.accelerator: this key was renamed .*generate.speedup"):
        load_config(preset="tiny", overrides=['tune_sampler.axes={"accelerator": ["none"]}'])


def test_settings_records_of_older_runs_read_under_the_new_key_names(tmp_path):
    from realfake_ray import storage
    from realfake_ray._internal.settings import read_settings, refuse_changed_settings

    url = str(tmp_path / "_settings.json")
    storage.write_json(url, {"guidance": "image", "accelerator": None, "steps": 4})
    assert read_settings(url) == {"vision_token": "image", "speedup": None, "steps": 4}
    refuse_changed_settings(url, {"vision_token": "image", "speedup": None, "steps": 4}, "the set")
    with pytest.raises(ValueError, match="vision_token: 'image' → 'none'"):
        refuse_changed_settings(url, {"vision_token": "none", "speedup": None, "steps": 4}, "the set")
