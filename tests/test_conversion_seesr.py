"""Converting the released SeeSR folders: a fake ``seesr/`` folder written in the released layout (SeeSR's config with
``use_image_cross_attention``, the base keys plus the ``image_attentions`` keys of the original blocks) splits into
diffusers' UNet / ControlNet and the two add-ons with every weight in place; anything that does not fit is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file
from seesr_tiny import COND_CHANNELS, IMAGE_DIM, seesr_image_attention_shapes
from stablesr_tiny import lr_image, random_state_dict, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

from sr_diffusion.checkpoints import CheckpointError
from sr_diffusion.conversion.seesr import convert_seesr, convert_seesr_model
from sr_diffusion.pipelines import AutoSRPipeline
from sr_diffusion.pipelines.seesr import SeeSRPipeline, seesr_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def write_released(folder, model, image_shapes, seed: int, weights="safetensors"):
    """A released-style model folder: SeeSR's config (``use_image_cross_attention``, diffusers 0.21) and one weight
    file with the base keys and random ``image_attentions`` keys."""
    folder.mkdir(parents=True)
    config = {
        "_class_name": type(model).__name__,
        "_diffusers_version": "0.21.0",
        **{k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "use_image_cross_attention": True,
    }
    config.pop("mid_block_type", None) if isinstance(model, ControlNetModel) else None  # not in SeeSR's ControlNet
    (folder / "config.json").write_text(json.dumps(config))
    state = {**{k: v.clone() for k, v in model.state_dict().items()}, **random_state_dict(image_shapes, seed=seed)}
    if weights == "safetensors":
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    unet = tiny_unet()
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.01)
    states = {
        "unet": write_released(root / "seesr" / "unet", unet, seesr_image_attention_shapes(), 2),
        "controlnet": write_released(
            root / "seesr" / "controlnet", controlnet, seesr_image_attention_shapes(up=False), 3, weights="bin"
        ),
    }
    base = root / "sd"
    for name, part in (("vae", tiny_vae()), ("text_encoder", tiny_text_encoder()), ("tokenizer", tiny_tokenizer())):
        part.save_pretrained(base / name)
    seesr_scheduler().save_pretrained(base / "scheduler")
    return root, states


def test_the_released_folders_load_with_every_weight_in_place(released, tmp_path):
    root, states = released
    pipe = convert_seesr(root / "seesr", root / "sd")
    assert isinstance(pipe, SeeSRPipeline) and pipe.prompt_extractor is None and pipe.image_prompt_dim == IMAGE_DIM
    for kind, model, extra in (
        ("unet", pipe.unet, pipe.unet_image_attentions),
        ("controlnet", pipe.controlnet, pipe.controlnet_image_attentions),
    ):
        merged = {**model.state_dict(), **extra.state_dict()}
        assert set(merged) == set(states[kind]), kind
        assert all(torch.equal(merged[k], v) for k, v in states[kind].items()), kind
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.timestep_spacing == "leading"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(lr_image(0), num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = AutoSRPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded, SeeSRPipeline)
    assert torch.equal(
        loaded.unet_image_attentions.state_dict()["up_blocks.0.image_attentions.1.proj_out.weight"],
        states["unet"]["up_blocks.0.image_attentions.1.proj_out.weight"],
    )


def test_names_that_do_not_fit_are_reported(released, tmp_path):
    root, _ = released
    folder = tmp_path / "unet"
    shutil.copytree(root / "seesr" / "unet", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)

    def write(new_state):
        save_file(new_state, weights)

    key = "mid_block.image_attentions.0.transformer_blocks.0.attn2.to_q.weight"
    write({k: v for k, v in state.items() if k != key})
    with pytest.raises(CheckpointError, match=rf"missing keys '{key}'"):
        convert_seesr_model(folder, "unet")
    write({**state, "up_blocks.1.image_attentions.0.proj_in.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match=r"unexpected keys 'up_blocks\.1\.image_attentions\.0\.proj_in\.weight'"):
        convert_seesr_model(folder, "unet")
    write({**state, "conv_in.weight": torch.zeros(32, 4, 1, 1)})
    with pytest.raises(CheckpointError, match=r"shape mismatches .*conv_in\.weight"):
        convert_seesr_model(folder, "unet")
    write({k: v for k, v in state.items() if ".image_attentions." not in k})
    with pytest.raises(CheckpointError, match="has no image_attentions weights .* not a SeeSR unet"):
        convert_seesr_model(folder, "unet")
    write(state)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "bogus_setting": 1}))
    with pytest.raises(CheckpointError, match=r"unknown UNet2DConditionModel settings \['bogus_setting'\]"):
        convert_seesr_model(folder, "unet")
    with pytest.raises(FileNotFoundError, match=r"not a released SeeSR folder \(no controlnet/config.json\)"):
        convert_seesr(tmp_path, root / "sd")
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion diffusers folder"):
        convert_seesr(root / "seesr", tmp_path)


def test_the_cli_detects_and_converts_a_seesr_folder(released, tmp_path, capsys):
    from sr_diffusion.cli import main

    root, _ = released
    assert main(["convert", str(root / "seesr"), str(tmp_path / "out"), "--base", str(root / "sd")]) == 0
    assert "wrote SeeSRPipeline x4" in capsys.readouterr().out
    assert isinstance(AutoSRPipeline.from_pretrained(tmp_path / "out"), SeeSRPipeline)
    assert main(["convert", str(root / "seesr"), str(tmp_path / "other"), "--arch", "seesr"]) == 2
    assert "pass --base" in capsys.readouterr().err
