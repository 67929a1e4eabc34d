"""Prompt extraction: the common interface and merge rules, and DAPE (SeeSR's degradation-aware prompt extractor on a
tiny random open_clip ViT with a peft LoRA): shapes, tag selection, save/load, and a learning test on real photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sr_diffusion.prompts import (
    DAPE,
    PromptExtraction,
    PromptExtractor,
    load_vocabulary,
    merge_prompts,
    resolve_prompts,
    select_tags,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "dape_tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

# A tiny open_clip CLIP: ViT width 64, 2 blocks of 2 heads, 64px input in 8px patches (64 tokens), average-pooled (a
# random tower's class token hardly depends on the image); a 1-block text tower. As configs/dape_tiny.yaml.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "pool_type": "avg"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_dape(seed: int = 0, **kwargs) -> DAPE:
    torch.manual_seed(seed)
    kwargs = {
        "model_config": TINY_CLIP,
        "lora_rank": 4,
        "cross_attention_dim": 48,
        "top_k": 5,
        "threshold": None,
        **kwargs,
    }
    return DAPE.from_open_clip("tiny-vit", **kwargs)


def perturb_lora_and_projector(dape: DAPE, seed: int = 1) -> None:
    """LoRA starts at B = 0 (a no-op); give it (and the projector) weights so that round trips are meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in dape.named_parameters():
            if "lora_B" in name or name.startswith("projector."):
                param.add_(0.1 * torch.randn(param.shape, generator=g))


@pytest.fixture(scope="module")
def dape() -> DAPE:
    return tiny_dape()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 48, 72, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------------
# merging with the user's prompts
# ----------------------------------------------------------------------------------------------------------------------


def test_the_users_prompt_comes_first_and_wins():
    tags = ["dog, grass, park", "cat, sofa"]
    prompts, negatives = merge_prompts(tags, "A Dog,  sunny day", added_prompt="clean, 8k")
    # the user's words first and verbatim; a tag the user already mentions is not repeated (whole words, any case)
    assert prompts == ["A Dog,  sunny day, grass, park, clean, 8k", "A Dog,  sunny day, cat, sofa, clean, 8k"]
    assert negatives == ["", ""]
    # "auto" / None / "": the tags alone
    for user in ("auto", " AUTO ", None, ""):
        assert merge_prompts(tags, user)[0] == ["dog, grass, park", "cat, sofa"]
    # per-image prompts; the negative prompt overrules extracted tags and is kept verbatim
    prompts, negatives = merge_prompts(
        tags, ["a puppy", None], ["wet  Grass, blur", None], default_negative_prompt="noisy"
    )
    assert prompts == ["a puppy, dog, park", "cat, sofa"]
    assert negatives == ["wet  Grass, blur", "noisy"]
    assert merge_prompts(["do, dog"], "hotdogs, a dog")[0] == ["hotdogs, a dog, do"]  # whole words only
    # a given empty negative prompt means "none", never the default
    assert merge_prompts(tags, None, "", default_negative_prompt="noisy")[1] == ["", ""]
    # repeated tags and added words are deduplicated, empty phrases dropped
    assert merge_prompts(["sky, sky, , clean"], "photo", added_prompt="clean, sharp")[0] == ["photo, sky, clean, sharp"]
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        merge_prompts(tags, ["a", "b", "c"])


class FixedExtractor(PromptExtractor):
    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        n = images.shape[0]
        return PromptExtraction([f"tag{i}, shared" for i in range(n)], soft_prompts=torch.zeros(n, 2, 4))


def test_resolve_prompts_runs_the_extractor_and_merges():
    images = torch.rand(2, 3, 8, 8)
    extractor = FixedExtractor()
    out = resolve_prompts("auto", images, extractor, negative_prompt=None, default_negative_prompt="blur")
    assert out.prompts == ["tag0, shared", "tag1, shared"] and out.negative_prompts == ["blur", "blur"]
    assert out.soft_prompts.shape == (2, 2, 4) and extractor.calls == 1
    out = resolve_prompts("a photo", images, extractor, negative_prompt="shared")
    assert out.prompts == ["a photo, tag0", "a photo, tag1"] and out.negative_prompts == ["shared", "shared"]
    # without an extractor the user's prompt is used as is, and "auto" is an error
    out = resolve_prompts("a photo", images)
    assert out.prompts == ["a photo", "a photo"] and out.soft_prompts is None
    with pytest.raises(ValueError, match="needs a prompt extractor"):
        resolve_prompts(["x", "auto"], images)


# ----------------------------------------------------------------------------------------------------------------------
# tags
# ----------------------------------------------------------------------------------------------------------------------


def test_select_tags_top_k_and_threshold():
    vocabulary = ["a", "b", "c", "d"]
    sims = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, -0.2, 0.05, 0.6]])
    tags, scores = select_tags(sims, vocabulary, top_k=3, threshold=None)
    assert tags == [["b", "c", "d"], ["a", "d", "c"]]  # best first
    torch.testing.assert_close(torch.tensor(scores), torch.tensor([[0.9, 0.5, 0.3], [0.8, 0.6, 0.05]]))
    assert select_tags(sims, vocabulary, top_k=3, threshold=0.4)[0] == [["b", "c"], ["a", "d"]]
    assert select_tags(sims, vocabulary, top_k=10, threshold=0.0)[0] == [["b", "c", "d", "a"], ["a", "d", "c"]]
    assert select_tags(sims, vocabulary, top_k=0, threshold=None)[0] == [[], []]
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        select_tags(sims[:, :3], vocabulary, 2, None)


def test_the_shipped_vocabulary():
    tags = load_vocabulary()
    assert 300 <= len(tags) <= 1000 and {"dog", "building", "sky", "person", "tree"} <= set(tags)
    assert len({t.lower() for t in tags}) == len(tags) and not any("," in t for t in tags)
    with pytest.raises(ValueError, match="duplicate"):
        load_vocabulary(["dog", "Dog"])


def test_hard_prompts_from_a_hand_built_vocabulary(dape, images):
    """Tag embeddings set to the images' own embeddings: each image's best tag is its own, scored 1."""
    with torch.no_grad():
        own = F.normalize(dape(images, return_prompts=False).image_embeds, dim=-1)
        d = tiny_dape()  # a fresh copy: set_vocabulary changes the model
        d.set_vocabulary(["first image", "second image", "third image"], own)
        assert d.config.vocabulary == ["first image", "second image", "third image"]
        out = d(images, top_k=2, threshold=-1)
        assert [tags[0] for tags in out.tags] == ["first image", "second image", "third image"]
        assert all(len(tags) == 2 for tags in out.tags)
        torch.testing.assert_close(torch.tensor([s[0] for s in out.tag_scores]), torch.ones(3), rtol=0, atol=1e-5)
        assert out.hard_prompts[0] == ", ".join(out.tags[0])
        # a threshold between the own score (1) and the others keeps the own tag only
        runner_up = max(s[1] for s in out.tag_scores)
        out = d(images, top_k=3, threshold=(1 + runner_up) / 2)
        assert out.hard_prompts == ["first image", "second image", "third image"]
        # the config's defaults apply when the call gives none
        d.register_to_config(top_k=1, threshold=None)
        assert d(images).hard_prompts == ["first image", "second image", "third image"]


# ----------------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------------


def test_interface_shapes(dape, images):
    assert isinstance(dape, PromptExtractor) and len(dape.vocabulary) == dape.tag_embeddings.shape[0]
    with torch.no_grad():
        out = dape(images)
    n_tokens = (64 // 8) ** 2
    assert isinstance(out, PromptExtraction) and len(out) == 3
    assert all(isinstance(p, str) and len(tags) == 5 for p, tags in zip(out.hard_prompts, out.tags))
    assert out.soft_prompts.shape == (3, 1 + n_tokens, 48)
    assert out.image_embeds.shape == (3, 32) and out.image_tokens.shape == (3, n_tokens, 64)
    assert out.similarities.shape == out.tag_logits.shape == (3, len(dape.vocabulary))
    assert out.similarities.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(out.tag_logits, dape.logit_scale.exp() * out.similarities)
    # any input size; a single (3, H, W) image; prompts skipped on request
    with torch.no_grad():
        assert dape(images[0]).soft_prompts.shape == (1, 1 + n_tokens, 48)
        bare = dape(images, return_prompts=False)
    assert bare.hard_prompts == [] and bare.soft_prompts is None
    torch.testing.assert_close(bare.image_embeds, out.image_embeds)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dape(torch.rand(1, 1, 32, 32))


def test_lora_targets_and_the_teacher_is_the_original_tower(images):
    """LoRA sits on every block's q/k/v projection and MLP and starts as a no-op; with it disabled the model is the
    original open_clip tower, whose weights (and only those) are frozen."""
    from sr_diffusion.prompts.dape import _build_visual

    dape = tiny_dape()
    adapter = dape.visual.peft_config["default"]
    assert sorted(adapter.target_parameters) == [f"transformer.resblocks.{i}.attn.in_proj_weight" for i in range(2)]
    assert sorted(adapter.target_modules) == sorted(
        f"transformer.resblocks.{i}.mlp.{name}" for i in range(2) for name in ("c_fc", "c_proj")
    )
    trainable = {n for n, p in dape.visual.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in dape.visual.named_parameters() if "lora_" not in n)

    original = _build_visual(TINY_CLIP)  # a plain open_clip tower with the same weights
    original.load_state_dict(dape.base_state_dict())
    with torch.no_grad():
        expected = original(dape.preprocess(images))[0]
        fresh, teacher = dape.encode(images)[0], dape.encode(images, use_lora=False)[0]
        perturb_lora_and_projector(dape)
        student, teacher_after = dape.encode(images)[0], dape.encode(images, use_lora=False)[0]
    torch.testing.assert_close(fresh, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher_after, expected, rtol=1e-5, atol=1e-5)
    assert (student - expected).abs().max() > 1e-2


def test_save_load_round_trip(tmp_path, images):
    dape = tiny_dape()
    perturb_lora_and_projector(dape)
    dape.save_pretrained(tmp_path / "dape")
    names = {p.relative_to(tmp_path / "dape").as_posix() for p in (tmp_path / "dape").rglob("*") if p.is_file()}
    assert {
        "config.json",
        "dape.safetensors",
        "base_model.safetensors",
        "lora/adapter_config.json",
        "lora/adapter_model.safetensors",
        "projector/config.json",
    } <= names
    loaded = DAPE.from_pretrained(tmp_path / "dape")
    assert not loaded.training and loaded.vocabulary == dape.vocabulary and loaded.config.top_k == 5
    with torch.no_grad():
        a, b = dape(images), loaded(images)
    assert a.hard_prompts == b.hard_prompts and a.tags == b.tags
    for name in ("soft_prompts", "image_embeds", "image_tokens", "similarities"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name

    # the adapter folder is a standard peft adapter: peft's own loader reproduces the student tower
    from peft import PeftModel

    from sr_diffusion.prompts.dape import _build_visual

    plain = _build_visual(dape.config.open_clip_config)
    plain.load_state_dict(dape.base_state_dict())
    peft_model = PeftModel.from_pretrained(plain, tmp_path / "dape" / "lora")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(dape.preprocess(images))[0], a.image_embeds, rtol=1e-5, atol=1e-5)


def test_from_a_local_open_clip_checkpoint(tmp_path, images):
    """Built from an open_clip checkpoint file, the folder leaves the frozen tower out and re-reads it from there."""
    import open_clip

    torch.manual_seed(3)
    clip = open_clip.CLIP(**TINY_CLIP)
    torch.save(clip.state_dict(), tmp_path / "tiny_clip.pt")
    torch.manual_seed(4)
    dape = DAPE.from_open_clip("tiny-vit", tmp_path / "tiny_clip.pt", model_config=TINY_CLIP, cross_attention_dim=48)
    assert dape.config.base_checkpoint == str((tmp_path / "tiny_clip.pt").resolve())
    for name, value in dape.base_state_dict().items():
        assert torch.equal(value, clip.visual.state_dict()[name]), name
    assert torch.equal(dape.logit_scale, clip.logit_scale.detach())

    perturb_lora_and_projector(dape)
    dape.save_pretrained(tmp_path / "dape")
    assert not (tmp_path / "dape" / "base_model.safetensors").exists()
    with torch.no_grad():
        expected = dape(images).soft_prompts
        torch.testing.assert_close(
            DAPE.from_pretrained(tmp_path / "dape")(images).soft_prompts, expected, rtol=0, atol=0
        )
        (tmp_path / "tiny_clip.pt").rename(tmp_path / "moved.pt")
        with pytest.raises(FileNotFoundError):
            DAPE.from_pretrained(tmp_path / "dape")
        moved = DAPE.from_pretrained(tmp_path / "dape", base_checkpoint=tmp_path / "moved.pt")
        torch.testing.assert_close(moved(images).soft_prompts, expected, rtol=0, atol=0)


def test_the_package_imports_open_clip_and_peft_lazily():
    """No module-level import of open_clip or peft (a fresh interpreter would take ~10 s to prove it at run time)."""
    import ast

    import sr_diffusion.prompts as package

    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("open_clip", "peft") for n in names), (path.name, names)


# ----------------------------------------------------------------------------------------------------------------------
# it learns: on held-out photos, the LoRA tower's embedding of a degraded crop moves towards the HR crop's
# ----------------------------------------------------------------------------------------------------------------------

LEARN_STEPS = 120


def _heldout_crops(size: int = 64, downscale: float = 0.375) -> torch.Tensor:
    """Crops of the validation photos (never trained on), shrunk first so that a crop shows a scene."""
    from sr_diffusion.resize import imresize
    from sr_diffusion.training.data import load_skimage_sklearn

    crops = []
    for _, photo in load_skimage_sklearn("val"):
        img = imresize(photo.float()[None] / 255, scale=downscale).clamp(0, 1)[0]
        for top in range(0, img.shape[-2] - size + 1, size // 2):
            for left in range(0, img.shape[-1] - size + 1, size // 2):
                crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops)


@pytest.mark.slow
def test_lora_fine_tune_aligns_degraded_with_hr_embeddings(tmp_path, fresh_accelerate_state):
    """``training/train_dape.py``'s task for LEARN_STEPS steps on Real-ESRGAN x2 pairs of the training photos, then on
    held-out crops (two degradation draws each): cos(student(LR), teacher(HR)) rises over cos(teacher(LR),
    teacher(HR)), while every weight of the tower (all but LoRA) stays bit-identical.

    A random tower barely sees degradations: its embedding is dominated by each patch's colour (1 - cos between LR
    and HR embeddings is under 0.01). So the tower's patch embedding is made blind to colour (zero-mean filters), which
    makes its tokens describe local structure, what a degradation changes (1 - cos ~0.15). Measured: 0.8507 -> 0.8643
    (0.8628 after 100 steps, 0.8625 after 200 with the default loss weights)."""
    from accelerate.utils import set_seed

    from sr_diffusion.degradations import RealESRGANDegradation, RealESRGANDegradationConfig
    from sr_diffusion.training import Trainer, load_config
    from sr_diffusion.training.dape import DAPEExperimentConfig, DAPETask

    class StructureTowerTask(DAPETask):
        def build_model(self, config):
            model = super().build_model(config)
            weights = model.base_state_dict()
            conv = weights["conv1.weight"]
            weights["conv1.weight"] = conv - conv.mean(dim=(2, 3), keepdim=True)
            model.load_base_state_dict(weights)
            return model

    config = load_config(
        TINY,
        [
            f"train.output_dir={tmp_path / 'run'}",
            f"train.max_steps={LEARN_STEPS}",
            "train.report_to=none",
            "train.checkpointing_steps=0",
            "scale=2",
            "data.random_downscale=[0.3, 0.45]",
            "optim.lr=2.0e-3",
            "dape.cosine_weight=5",  # the term this test measures (0.8507 -> 0.8600 with 1, -> 0.8643 with 5)
        ],
        cls=DAPEExperimentConfig,
    )
    set_seed(config.train.seed)
    task = StructureTowerTask()
    task.check_config(config)
    initial = task.build_model(config)  # what the Trainer builds under the same seed
    result = Trainer(config, task).train()
    assert result.global_step == LEARN_STEPS

    trained = DAPE.from_pretrained(result.pipeline_dir)
    before, after = initial.base_state_dict(), trained.base_state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.abs().max() > 0 for k, v in trained.lora_state_dict().items() if "lora_B" in k)

    hr = _heldout_crops()
    degradation = RealESRGANDegradation(RealESRGANDegradationConfig(scale=2))
    with torch.no_grad():
        target = trained(hr, use_lora=False, return_prompts=False).image_embeds
        base, tuned = [], []
        for seed in (1, 2):
            lr = degradation.degrade(hr, torch.Generator().manual_seed(seed))
            base.append(F.cosine_similarity(trained(lr, use_lora=False, return_prompts=False).image_embeds, target))
            tuned.append(F.cosine_similarity(trained(lr, return_prompts=False).image_embeds, target))
    base, tuned = torch.cat(base).mean().item(), torch.cat(tuned).mean().item()
    assert base < 0.95  # the tower does see the degradation
    print(f"held-out cos(LR, HR): {base:.4f} -> {tuned:.4f}")
    assert tuned > base + 0.007, (base, tuned)
