"""The method registry (sr_diffusion.registry): the built-in entries, and an 8th method added from inside this test
with one ``register_method`` call (a pipeline, a converter + detector of its "original" checkpoint, a training task),
run through the public entry points: ``sr-diffusion convert``, ``sr-diffusion upscale --model``,
``AutoSRPipeline.from_pretrained`` and ``python -m sr_diffusion.training --method``. docs/adding_a_method.md walks
through the same toy method."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from sr_diffusion.checkpoints import CheckpointError
from sr_diffusion.cli import main as cli_main
from sr_diffusion.models.edsr import EDSR
from sr_diffusion.pipelines import PIPELINE_CLASSES, AutoSRPipeline
from sr_diffusion.pipelines.pipeline_output import SRPipelineOutput
from sr_diffusion.registry import (
    Method,
    detect_method,
    method,
    methods,
    register_method,
    resolve,
    unregister_method,
)
from sr_diffusion.training import TrainingTask
from sr_diffusion.training.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "regression_tiny.yaml"

# ---------------------------------------------------------------------------------------------------
# the toy method: an x2 EDSR behind its own pipeline class, its own checkpoint format and its own training task

MARKER = "toy_sr_format_version"  # the key that identifies a toy checkpoint
PREFIX = "toy_sr."  # every weight of the original toy checkpoint is stored under it


def tiny_edsr(upscale: int = 2) -> EDSR:
    return EDSR(num_feat=4, num_block=1, upscale=upscale)


class ToySRPipeline(DiffusionPipeline):
    """A one-network pipeline: ``model`` (an EDSR) on the whole image."""

    def __init__(self, model: EDSR):
        super().__init__()
        self.register_modules(model=model)

    @property
    def upscale(self) -> int:
        return self.model.config.upscale

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image, tile_size: int | None = None) -> SRPipelineOutput:
        if tile_size is not None:
            raise ValueError("ToySRPipeline does not tile")
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        sr = self.model(x.to(self.device, self.model.dtype), return_dict=False)[0].float().clamp(0, 1)
        array = (sr[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        return SRPipelineOutput(images=[PIL.Image.fromarray(array)])


def detect_toy(probe) -> bool:
    return MARKER in probe.state_dict


def convert_toy(args) -> ToySRPipeline:
    from sr_diffusion.checkpoints import CheckpointError
    from sr_diffusion.conversion.resshift import read_flat_state_dict

    state_dict, source = read_flat_state_dict(args.checkpoint)
    weights = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    if MARKER not in state_dict or not weights:
        raise CheckpointError(f"{source} is not a toy SR checkpoint")
    upscale = int(state_dict[MARKER][1])
    if args.scale and args.scale != upscale:
        raise CheckpointError(f"{source} is an x{upscale} toy model, but --scale {args.scale} was requested")
    model = tiny_edsr(upscale)
    model.load_state_dict(weights, strict=True)
    return ToySRPipeline(model=model)


class ToyTask(TrainingTask):
    def build_model(self, config):
        return tiny_edsr(config.scale)

    def compute_loss(self, model, batch, generator):
        return torch.nn.functional.l1_loss(model(batch["lr"], return_dict=False)[0], batch["hr"])

    def predict(self, model, lr, generator):
        return model(lr, return_dict=False)[0]

    def build_pipeline(self, model):
        return ToySRPipeline(model=model)


TOY = Method(
    name="toy",
    pipeline=ToySRPipeline,  # built-in entries give "module:Class" strings, imported when used
    converter=convert_toy,
    detector=detect_toy,
    detect_order=5,
    training_task=ToyTask,
    config="sr_diffusion.training.config:ExperimentConfig",
    description="a toy x2 EDSR (tests/test_registry.py)",
)


@pytest.fixture
def toy():
    register_method(TOY)
    yield TOY
    unregister_method("toy")


def save_original_toy_checkpoint(path: Path, upscale: int = 2) -> EDSR:
    torch.manual_seed(0)
    model = tiny_edsr(upscale)
    state = {PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    torch.save({**state, MARKER: torch.tensor([1, upscale])}, path)
    return model


def lr_image(seed: int = 0, size: int = 12) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------
# the built-in entries


def test_builtin_methods_are_registered_with_their_pipelines_converters_and_tasks():
    names = [entry.name for entry in methods()]
    assert names[:4] == ["edsr", "rrdbnet", "swinir", "srvgg"]
    assert {"sr3", "srdiff", "ldm_sr", "resshift", "stablesr", "pasd", "seesr"} <= set(names)
    assert set(PIPELINE_CLASSES) == {
        "RegressionSRPipeline",
        "SR3Pipeline",
        "SRDiffPipeline",
        "LDMSRPipeline",
        "ResShiftPipeline",
        "StableSRPipeline",
        "PASDPipeline",
        "SeeSRPipeline",
    }
    for entry in methods():
        cls = entry.pipeline_class()
        assert cls.__name__ == entry.pipeline_class_name and PIPELINE_CLASSES[cls.__name__] is cls
        accepted = inspect.signature(cls.__call__).parameters
        assert set(entry.fidelity_knobs) <= set(accepted), entry.name
        for ref in (entry.converter, entry.detector):
            assert ref is None or callable(resolve(ref))
        if entry.training_task is not None:
            assert issubclass(entry.config_class(), object) and isinstance(entry.task(), TrainingTask)
    assert method("stablesr").fidelity_knobs == ("fidelity_weight",)
    assert method("resshift").cli_options == ("--preset", "--vae")
    with pytest.raises(KeyError, match="registered: edsr"):
        method("nope")


def test_importing_the_registry_is_light():
    code = (
        "import sys, sr_diffusion.registry as r; r.methods(); "
        "heavy = ('torch', 'diffusers', 'sr_diffusion.training', 'sr_diffusion.pipelines'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_entries_are_validated_and_names_unique():
    with pytest.raises(ValueError, match="unknown convert option"):
        Method(name="x", pipeline="m:C", cli_options=("--nope",))
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method(name="sr3", pipeline="m:C"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        method("sr3").name = "x"


# ---------------------------------------------------------------------------------------------------
# the toy method through the public entry points


def test_toy_method_converts_upscales_and_loads_through_the_public_entry_points(toy, tmp_path, capsys):
    ckpt = str(tmp_path / "toy.pth")
    original = save_original_toy_checkpoint(tmp_path / "toy.pth")
    # convert: auto-detected (its detector), then also with --arch (the registry gives the choices)
    assert detect_method(ckpt) is toy
    assert cli_main(["convert", ckpt, str(tmp_path / "pipe")]) == 0
    assert "wrote ToySRPipeline x2" in capsys.readouterr().out
    assert cli_main(["convert", ckpt, str(tmp_path / "pipe2"), "--arch", "toy", "--scale", "2"]) == 0
    # a flag the entry does not list is refused, naming the methods it is for
    assert cli_main(["convert", ckpt, str(tmp_path / "pipe3"), "--preset", "v3"]) == 2
    err = capsys.readouterr().err
    assert "--preset is for ResShift checkpoints" in err and "holds toy" in err
    assert cli_main(["convert", ckpt, str(tmp_path / "pipe4"), "--scale", "4"]) == 2
    assert not (tmp_path / "pipe3").exists() and not (tmp_path / "pipe4").exists()

    # the library form of convert, from the package exports
    from sr_diffusion.conversion import convert_checkpoint

    assert type(convert_checkpoint(ckpt)) is ToySRPipeline
    with pytest.raises(ValueError, match="--vae is for ResShift and StableSR checkpoints"):
        convert_checkpoint(ckpt, "toy", vae="x.pth")

    # AutoSRPipeline finds the class through the registry; the weights are the original's, bit for bit
    pipe = AutoSRPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe) is ToySRPipeline and "ToySRPipeline" in PIPELINE_CLASSES
    for key, value in original.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[key], value), key

    # upscale --model: the file is the model's output on the image, quantised to 8 bits
    lr = lr_image()
    lr.save(tmp_path / "lr.png")
    args = ["upscale", str(tmp_path / "lr.png"), "-o", str(tmp_path / "sr.png"), "--model", str(tmp_path / "pipe")]
    assert cli_main([*args, "--device", "cpu", "-q"]) == 0
    sr = np.asarray(PIL.Image.open(tmp_path / "sr.png"))
    x = torch.from_numpy(np.asarray(lr, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        reference = original(x, return_dict=False)[0].clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255
    assert sr.shape == (24, 32, 3)
    # the same float32 operations on the same input in both: identical bytes
    np.testing.assert_array_equal(sr, reference.round().astype(np.uint8))
    # an option the toy's __call__ lacks is refused by the CLI, as for any pipeline
    assert cli_main([*args[:3], str(tmp_path / "sr2.png"), *args[4:], "--steps", "3"]) == 2


def test_toy_method_does_not_disturb_the_detection_of_the_others(toy, tmp_path):
    from sr_diffusion.models import RRDBNet

    torch.save({"params": RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=4).state_dict()}, tmp_path / "r.pth")
    assert detect_method(tmp_path / "r.pth").name == "rrdbnet"
    # the toy's detector reads the state dict first (detect_order 5): a released PASD / SeeSR folder is no state dict,
    # and is still the folder detectors'
    (tmp_path / "pasd" / "unet").mkdir(parents=True)
    (tmp_path / "pasd" / "controlnet").mkdir()
    assert detect_method(tmp_path / "pasd").name == "pasd"
    with pytest.raises(CheckpointError, match="does not exist"):  # the read error, not a detector's
        detect_method(tmp_path / "missing.pth")


def test_unregistered_toy_folder_is_refused_by_auto_pipeline(tmp_path):
    register_method(TOY)
    try:
        save_original_toy_checkpoint(tmp_path / "toy.pth")
        assert cli_main(["convert", str(tmp_path / "toy.pth"), str(tmp_path / "pipe")]) == 0
    finally:
        unregister_method("toy")
    assert "ToySRPipeline" not in PIPELINE_CLASSES
    with pytest.raises(ValueError, match="'ToySRPipeline' is not an sr_diffusion pipeline"):
        AutoSRPipeline.from_pretrained(tmp_path / "pipe")


def test_toy_method_trains_through_the_generic_entry_point(toy, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", "train.max_steps=3", "train.validation_steps=3", "train.report_to=none"]
    result = train_main(["--method", "toy", "--config", str(TINY), *overrides, "train.checkpointing_steps=3"])
    assert result.global_step == 3 and len(result.losses) == 3
    assert all(np.isfinite(loss) and loss > 0 for loss in result.losses)
    pipe = AutoSRPipeline.from_pretrained(result.pipeline_dir)
    assert type(pipe) is ToySRPipeline and pipe.upscale == 4  # the config's scale
    # trained: the exported (EMA) weights moved away from the seeded initialisation of build_model
    torch.manual_seed(0)
    initial = tiny_edsr(4).state_dict()
    trained = pipe.model.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if initial[k].is_floating_point())
    # --list shows it among the trainable methods
    assert train_main(["--list"]) is None
    assert any(line.startswith("toy ") for line in capsys.readouterr().out.splitlines())


def test_training_entry_point_refuses_a_regression_config_of_another_arch(capsys):
    with pytest.raises(SystemExit) as exit:
        train_main(["--method", "rrdbnet", "--config", str(TINY)])
    assert exit.value.code == 2
    assert "model.arch=rrdbnet" in capsys.readouterr().err
