"""UNetLoRA: low-rank adapters for a frozen UNet held outside it. A fresh adapter changes nothing; the hooked forward
equals the fused one and ``W x + b + (alpha/r) B A x`` by hand; the hooks go away after the block; the add-on saves and
loads; its diffusers/peft state dict, written by ``save_lora_weights`` and read by ``pipe.load_lora_weights`` into a
tiny StableSR pipeline, gives the hooked output; bad targets and ranks are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from stablesr_tiny import lr_image, tiny_components, tiny_unet

from sr_diffusion.models import UNetLoRA
from sr_diffusion.pipelines.stablesr import StableSRPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    return sample, torch.tensor([10, 500]), text


def random_lora(unet, rank: int = 4, alpha: float | None = 8.0, seed: int = 1) -> UNetLoRA:
    torch.manual_seed(seed)
    lora = UNetLoRA.for_unet(unet, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers:
            layer.lora_B.weight.copy_(0.2 * torch.randn(layer.lora_B.weight.shape, generator=g))
    return lora


def run_unet(unet, inputs):
    sample, t, text = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=text).sample


def test_targets_are_every_attention_projection():
    unet = tiny_unet()
    lora = UNetLoRA.for_unet(unet, rank=2)
    # tiny UNet: one transformer block in down_blocks.1, mid_block, and up_blocks.0 (x2): 4 blocks, attn1 + attn2
    assert len(lora.paths) == 4 * 2 * 4
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in lora.paths
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0" in lora.paths
    assert lora.config.targets["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == [32, 64]
    assert lora.scale == 1.0 and UNetLoRA.for_unet(unet, rank=4, alpha=2).scale == 0.5
    layer = lora.layers[0]
    assert layer.lora_A.weight.abs().sum() > 0 and not layer.lora_B.weight.any()
    assert not any(name.startswith("layers") for name, _ in unet.named_parameters())  # nothing added to the UNet
    only_q = UNetLoRA.for_unet(unet, rank=2, target_modules=["to_q"])
    assert all(p.endswith("to_q") for p in only_q.paths) and len(only_q.paths) == 8


def test_fresh_adapter_changes_nothing_and_hooks_are_removed():
    unet, inputs = tiny_unet(), unet_inputs()
    reference = run_unet(unet, inputs)
    with UNetLoRA.for_unet(unet, rank=4).attach(unet):
        torch.testing.assert_close(run_unet(unet, inputs), reference, rtol=0, atol=0)
    lora = random_lora(unet)
    with lora.attach(unet):
        changed = run_unet(unet, inputs)
    assert (changed - reference).abs().max() > 1e-3
    torch.testing.assert_close(run_unet(unet, inputs), reference, rtol=0, atol=0)  # hooks gone
    assert all(not m._forward_hooks for m in unet.modules())
    with pytest.raises(RuntimeError, match="inside"), lora.attach(unet):
        raise RuntimeError("inside")
    assert all(not m._forward_hooks for m in unet.modules())  # gone after an error too


def test_hooked_forward_equals_fused_forward_and_the_formula():
    unet, inputs = tiny_unet(), unet_inputs()
    lora = random_lora(unet, rank=4, alpha=8.0)
    with lora.attach(unet):
        hooked = run_unet(unet, inputs)
    fused = lora.fuse_into(copy.deepcopy(unet))
    torch.testing.assert_close(run_unet(fused, inputs), hooked, rtol=1e-5, atol=1e-5)
    # one layer by hand: W' = W + (alpha / r) B A
    path, layer = lora.paths[0], lora.layers[0]
    w = dict(unet.named_modules())[path].weight
    expected = w + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(dict(fused.named_modules())[path].weight, expected)
    x = torch.randn(3, w.shape[1])
    with lora.attach(unet), torch.no_grad():
        torch.testing.assert_close(dict(unet.named_modules())[path](x), x @ expected.T, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_adapter_only():
    unet, inputs = tiny_unet().requires_grad_(False), unet_inputs()
    lora = UNetLoRA.for_unet(unet, rank=2)
    sample, t, text = inputs
    with lora.attach(unet):
        unet(sample, t, encoder_hidden_states=text).sample.square().mean().backward()
    assert all(p.grad is not None for p in lora.parameters())
    assert lora.layers[0].lora_B.weight.grad.abs().sum() > 0  # B gets a gradient from the start (A does once B != 0)
    assert all(p.grad is None for p in unet.parameters())


def test_save_and_load_round_trip(tmp_path):
    unet = tiny_unet()
    lora = random_lora(unet, rank=3, alpha=1.5)
    lora.save_pretrained(tmp_path / "lora")
    loaded = UNetLoRA.from_pretrained(tmp_path / "lora")
    assert loaded.paths == lora.paths and loaded.scale == lora.scale == 0.5
    for key, value in lora.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    inputs = unet_inputs()
    with lora.attach(unet):
        expected = run_unet(unet, inputs)
    with loaded.attach(unet):
        torch.testing.assert_close(run_unet(unet, inputs), expected, rtol=0, atol=0)


def test_save_lora_weights_loads_into_a_pipeline_with_the_hooked_output(tmp_path):
    pipe = StableSRPipeline(**tiny_components(cfw=False))
    pipe.set_progress_bar_config(disable=True)
    lora = random_lora(pipe.unet, rank=4, alpha=8.0)  # scale 2: the file must carry it
    StableSRPipeline.save_lora_weights(tmp_path / "unet_lora", unet_lora_layers=lora.peft_state_dict())
    assert (tmp_path / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()

    inputs = unet_inputs()
    kwargs = {"num_inference_steps": 2, "output_type": "pt"}
    with lora.attach(pipe.unet):
        hooked_unet = run_unet(pipe.unet, inputs)
        hooked = pipe(lr_image(0), generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe(lr_image(0), generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (hooked - plain).abs().max() > 1e-3

    pipe.load_lora_weights(tmp_path / "unet_lora")
    torch.testing.assert_close(run_unet(pipe.unet, inputs), hooked_unet, rtol=1e-4, atol=1e-4)
    loaded = pipe(lr_image(0), generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(loaded, hooked, rtol=1e-4, atol=1e-4)


def test_errors():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="no nn.Linear of the UNet is named 'to_qkv'"):
        UNetLoRA.for_unet(unet, rank=4, target_modules=["to_q", "to_qkv"])
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        UNetLoRA.for_unet(unet, rank=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        UNetLoRA.for_unet(unet, rank=4, alpha=0)
    with pytest.raises(ValueError, match="at least one target"):
        UNetLoRA(targets={})
    lora = UNetLoRA.for_unet(unet, rank=2)
    other = tiny_unet(cross_attention_dim=16)
    with pytest.raises(ValueError, match="maps 16 -> 64 features, the LoRA 32 -> 64"), lora.attach(other):
        pass
    assert all(not m._forward_hooks for m in other.modules())
