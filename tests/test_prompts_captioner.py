"""BlipCaptioner: PASD's caption prompts from a tiny random BLIP (offline BERT tokenizer) — equivalence with
transformers' own generate, PASD's word replacements, merging after the user's prompt, save/load and errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

from sr_diffusion.prompts import BlipCaptioner, resolve_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["a", "picture", "of", "dog", "cat", "on", "the", "grass", "blurry", "noisy", "photo", "red", "car", "sky"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizer:
    folder = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")


def tiny_blip_config(tokenizer) -> dict:
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}  # fmt: skip
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
            "num_attention_heads": 2, "encoder_hidden_size": 32, "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id}  # fmt: skip
    return BlipConfig(vision_config=vision, text_config=text, projection_dim=32).to_dict()


def make_captioner(tokenizer, **overrides) -> BlipCaptioner:
    torch.manual_seed(0)
    kwargs = {"image_size": 32, "num_beams": 2, "min_new_tokens": 2, "max_new_tokens": 6, **overrides}
    captioner = BlipCaptioner(blip_config=tiny_blip_config(tokenizer), **kwargs).eval()
    captioner.set_tokenizer(tokenizer)
    return captioner


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 20, 28, generator=torch.Generator().manual_seed(seed))


def test_captions_equal_transformers_generate_with_the_text_prompt(tokenizer):
    captioner = make_captioner(tokenizer, replacements={})
    x = images()
    out = captioner(x)
    assert len(out.hard_prompts) == 2 and out.soft_prompts is None
    # the same model through transformers directly, with the same preprocessing and prompt
    ids = tokenizer(["a picture of"] * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = captioner.model.generate(
            pixel_values=captioner.preprocess(x), input_ids=ids, num_beams=2, min_new_tokens=2, max_new_tokens=6
        )
    expected = [" ".join(t.split()) for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert all(e.startswith("a picture of") for e in expected)
    assert out.hard_prompts == [e[len("a picture of") :].strip(" ,") for e in expected]
    assert all(p for p in out.hard_prompts)  # min_new_tokens words after the prompt


def test_clean_strips_the_prompt_and_replaces_degradation_words(tokenizer):
    captioner = make_captioner(tokenizer)
    assert captioner.clean("a picture of a  Blurry dog on noisy grass") == "a clear dog on clean grass"
    assert captioner.clean("blurryish sky") == "blurryish sky"  # whole words only
    plain = make_captioner(tokenizer, text_prompt=None, replacements={})
    assert plain.clean("a picture of a blurry dog") == "a picture of a blurry dog"


def test_user_prompt_comes_first_and_negative_is_verbatim(tokenizer):
    captioner = make_captioner(tokenizer)
    x = images()
    captions = captioner(x).hard_prompts
    resolved = resolve_prompts("my words", x, captioner, negative_prompt="")
    for merged, caption in zip(resolved.prompts, captions):
        assert merged.startswith("my words")
        assert caption in merged
    assert resolved.negative_prompts == ["", ""]
    auto = resolve_prompts("auto", x, captioner)
    assert auto.prompts == captions


def test_save_load_round_trip(tokenizer, tmp_path):
    captioner = make_captioner(tokenizer)
    captioner.save_pretrained(tmp_path / "captioner")
    loaded = BlipCaptioner.from_pretrained(tmp_path / "captioner")
    x = images(seed=3)
    assert loaded(x).hard_prompts == captioner(x).hard_prompts
    assert loaded.config.text_prompt == "a picture of"


def test_from_blip_reads_a_transformers_folder(tokenizer, tmp_path):
    torch.manual_seed(1)
    blip = BlipForConditionalGeneration(BlipConfig(**tiny_blip_config(tokenizer))).eval()
    folder = tmp_path / "blip"
    blip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    captioner = BlipCaptioner.from_blip(folder, num_beams=1, min_new_tokens=1, max_new_tokens=4)
    assert captioner.config.image_size == 32 and tuple(captioner.config.image_mean) == (0.5, 0.5, 0.5)
    for name, p in blip.state_dict().items():
        assert torch.equal(captioner.model.state_dict()[name], p)
    x = images(batch=1)
    ids = tokenizer(["a picture of"], return_tensors="pt").input_ids
    pixels = (torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1) - 0.5) / 0.5
    with torch.no_grad():
        generated = blip.generate(pixel_values=pixels, input_ids=ids, num_beams=1, min_new_tokens=1, max_new_tokens=4)
    expected = captioner.clean(tokenizer.batch_decode(generated, skip_special_tokens=True)[0])
    assert captioner(x).hard_prompts == [expected]


def test_errors(tokenizer, tmp_path):
    captioner = make_captioner(tokenizer)
    with pytest.raises(ValueError, match="RGB"):
        captioner(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        captioner(torch.full((1, 3, 8, 8), float("nan")))
    bare = BlipCaptioner(blip_config=tiny_blip_config(tokenizer), image_size=32)
    with pytest.raises(ValueError, match="no tokenizer"):
        bare(images())
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.save_pretrained(tmp_path / "x")
    small = BlipCaptioner(blip_config={**tiny_blip_config(tokenizer), "text_config": {"vocab_size": 5}})
    with pytest.raises(ValueError, match="different models"):
        small.set_tokenizer(tokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        BlipCaptioner.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a transformers BLIP folder"):
        BlipCaptioner.from_blip(tmp_path)
