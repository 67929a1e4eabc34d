"""The training config's type checks (pydantic over the section dataclasses): which values each annotation takes or
refuses, the wording of the errors, open sections, method sections, and a section's own ``__post_init__`` check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from sr_diffusion.training.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)


@dataclass
class ToySection:
    ratio: float = 0.5
    steps: int | None = None

    def __post_init__(self):
        if self.ratio > 1:
            raise ConfigError(f"toy.ratio: must be <= 1, got {self.ratio}")


@dataclass
class ToyOpenSection:
    _extra_field = "kwargs"

    name: str = "base"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToyExperimentConfig(ExperimentConfig):
    toy: ToySection = field(default_factory=ToySection)
    plugin: ToyOpenSection = field(default_factory=ToyOpenSection)


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("optim.lr=3", "optim.lr", 3.0),  # an int for a float
        ("optim.lr=1e-4", "optim.lr", 1e-4),  # PyYAML reads 1e-4 as the string '1e-4'
        ("optim.betas=[0, 0.5]", "optim.betas", (0.0, 0.5)),  # a list for a tuple
        ("optim.max_grad_norm=null", "optim.max_grad_norm", None),
        ("optim.max_grad_norm=2", "optim.max_grad_norm", 2.0),
        ("data.random_downscale=[0.5, 1]", "data.random_downscale", [0.5, 1.0]),
        ("data.use_hflip=false", "data.use_hflip", False),
        ("train.loss=mse", "train.loss", "mse"),
        ("train.max_steps=12", "train.max_steps", 12),
        ("model=null", "model", ModelConfig()),  # an empty section: its defaults
    ],
)
def test_accepted_values(override, key, value):
    config = load_config(None, [override])
    got = config
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=true", "train.max_steps: expected an integer, got True"),
        ("train.max_steps=3.0", "train.max_steps: expected an integer, got 3.0"),
        ("train.max_steps='3'", "train.max_steps: expected an integer, got '3'"),
        ("train.max_steps=null", "train.max_steps: expected an integer, got None"),
        ("optim.lr=true", "optim.lr: expected a number, got True"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("optim.max_grad_norm=false", "optim.max_grad_norm: expected a number, got False"),
        ("data.use_hflip=1", "data.use_hflip: expected true/false, got 1"),
        ("data.use_hflip='true'", "data.use_hflip: expected true/false, got 'true'"),
        ("train.output_dir=3", "train.output_dir: expected a string, got 3"),
        ("train.init_from=5", "train.init_from: expected a string, got 5"),
        ("train.loss=1", "train.loss: must be one of 'l1', 'mse', 'charbonnier'; got 1"),
        ("optim.milestones=[1, 2.5]", "optim.milestones[1]: expected an integer, got 2.5"),
        ("optim.milestones=5", "optim.milestones: expected a list, got 5"),
        ("optim.betas=[0.9, 0.9, 0.9]", "optim.betas: expected 2 values, got 3"),
        ("optim.betas=[0.9, x]", "optim.betas[1]: expected a number, got 'x'"),
        ("data.hr_dirs=[a, 3]", "data.hr_dirs[1]: expected a string, got 3"),
        ("data=[1]", "data: expected a mapping (section), got [1]"),
        ("data=[]", "data: expected a mapping (section), got []"),
        ("model=", "model: expected a mapping (section), got ''"),
        ("model.arch=3", "model.arch: expected a string, got 3"),
        ("data.degradation.type=jpeg", "data.degradation.type: must be one of 'bicubic', 'realesrgan', 'bsrgan'"),
        ("train={max_steps: 3, bogus: 1}", "unknown config key 'train.bogus'; valid keys in train: output_dir,"),
    ],
)
def test_refused_values_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)


def test_every_error_of_one_load_in_one_config_error():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.gt_size=[1]", "train.loss=huber", "trian.max_steps=3"])
    assert str(err.value).splitlines() == [
        "data.gt_size: expected an integer, got [1]",
        "train.loss: must be one of 'l1', 'mse', 'charbonnier'; got 'huber'",
        "unknown config key 'trian' (did you mean 'train'?); valid keys in the top level: "
        "scale, model, data, validation, optim, train",
    ]


def test_yaml_file_and_open_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  arch: edsr\n  num_feat: 8\noptim:\n  lr: 1e-4\ndata:\n  degradation:\ntrain:\n")
    config = load_config(path, ["data.degradation.type=bsrgan", "data.degradation.noise_prob=0.5"])
    assert config.model == ModelConfig(arch="edsr", kwargs={"num_feat": 8})
    assert config.optim.lr == 1e-4 and type(config.optim.lr) is float
    assert config.data.degradation.type == "bsrgan" and config.data.degradation.kwargs == {"noise_prob": 0.5}
    assert config.train == ExperimentConfig().train
    with pytest.raises(ConfigError, match=r"^model\.1: keys must be strings$"):
        config_from_dict({"model": {1: 2}})


def test_method_sections():
    config = load_config(
        None, ["toy.steps=3", "plugin.name=p", "plugin.depth=2", "plugin.kwargs=1"], ToyExperimentConfig
    )
    assert config.toy == ToySection(ratio=0.5, steps=3)
    # an open section keeps its other keys, "kwargs" included, and flattens them back
    assert config.plugin == ToyOpenSection(name="p", kwargs={"depth": 2, "kwargs": 1})
    assert config_to_dict(config)["plugin"] == {"name": "p", "depth": 2, "kwargs": 1}
    assert config_from_dict(config_to_dict(config), ToyExperimentConfig) == config
    # a section given as an instance (an override pair) is taken as is
    assert load_config(None, [("toy", ToySection(ratio=0.25))], ToyExperimentConfig).toy == ToySection(ratio=0.25)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["toy.ration=0.1"], ToyExperimentConfig)
    assert str(err.value) == (
        "unknown config key 'toy.ration' (did you mean 'toy.ratio'?); valid keys in toy: ratio, steps"
    )
    with pytest.raises(ConfigError) as err:
        load_config(None, ["toy.steps=2.5"], ToyExperimentConfig)
    assert str(err.value) == "toy.steps: expected an integer, got 2.5"
    # the section's own check (__post_init__) keeps its message
    with pytest.raises(ConfigError) as err:
        load_config(None, ["toy.ratio=2"], ToyExperimentConfig)
    assert str(err.value) == "toy.ratio: must be <= 1, got 2.0"
    with pytest.raises(ConfigError, match="unknown config key 'toy'"):
        load_config(None, ["toy.ratio=0.1"])  # not a section of the base config
