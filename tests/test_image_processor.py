import io

import numpy as np
import PIL.Image
import pytest
import torch

from sr_diffusion.image_processor import (
    ImageLoadError,
    SRImageProcessor,
    crop_to_size,
    load_image,
    pad_to_multiple,
    save_image,
)

proc = SRImageProcessor()


def test_rgb_pil_roundtrip_is_exact(photo):
    pre = proc.preprocess(PIL.Image.fromarray(photo))
    assert pre.rgb.shape == (1, 3, 96, 128) and pre.alpha is None
    out = proc.postprocess(pre.rgb, output_type="np")
    np.testing.assert_array_equal((out[0] * 255).round().astype(np.uint8), photo)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK"])
def test_modes_become_rgb(photo, mode):
    img = PIL.Image.fromarray(photo).convert(mode)
    pre = proc.preprocess(img)
    assert pre.rgb.shape == (1, 3, 96, 128) and pre.alpha is None
    if mode in ("L", "1"):
        assert torch.equal(pre.rgb[:, 0], pre.rgb[:, 1]) and torch.equal(pre.rgb[:, 1], pre.rgb[:, 2])


def test_rgba_alpha_is_carried(photo):
    alpha = np.tile(np.linspace(0, 255, 128).astype(np.uint8), (96, 1))
    img = PIL.Image.fromarray(np.dstack([photo, alpha]), mode="RGBA")
    pre = proc.preprocess(img)
    assert pre.alpha is not None and pre.alpha.shape == (1, 1, 96, 128)
    torch.testing.assert_close(pre.alpha[0, 0], torch.from_numpy(alpha).float() / 255)
    out = proc.postprocess(pre.rgb, pre.alpha)[0]
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[..., 3], alpha)


def test_la_and_palette_with_transparency(photo):
    la = PIL.Image.fromarray(photo).convert("LA")
    assert proc.preprocess(la).alpha is not None
    pal = PIL.Image.fromarray(photo).convert("P")
    pal.info["transparency"] = 0
    pre = proc.preprocess(pal)
    assert pre.alpha is not None and (pre.alpha == 0).any()
    assert proc.preprocess(PIL.Image.fromarray(photo).convert("P")).alpha is None


def test_sixteen_bit_png(tmp_path):
    ramp = (np.arange(64 * 32).reshape(32, 64) * 32).astype(np.uint16)
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(ramp).save(path)
    pre = proc.preprocess(load_image(path))
    assert pre.rgb.shape == (1, 3, 32, 64)
    torch.testing.assert_close(pre.rgb[0, 0], torch.from_numpy(ramp.astype(np.float32) / 65535))


def test_exif_rotation_is_applied(photo, tmp_path):
    img = PIL.Image.fromarray(photo)  # 128 wide, 96 high
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (96, 128)


def test_numpy_and_tensor_inputs(photo):
    a = proc.preprocess(photo).rgb
    b = proc.preprocess(torch.from_numpy(photo).permute(2, 0, 1).float() / 255).rgb
    c = proc.preprocess(photo.astype(np.float32) / 255).rgb
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert proc.preprocess([photo, photo]).rgb.shape == (2, 3, 96, 128)
    assert proc.preprocess(np.zeros((1, 1), np.uint8)).rgb.shape == (1, 3, 1, 1)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((3, 4, 4), float("nan")), "NaN"),
        (torch.full((3, 4, 4), 2.0), r"\[0, 1\]"),
        (torch.zeros(5, 4, 4), "C in 1..4"),
        (torch.zeros(3, 4, 4, dtype=torch.uint8), "floating point"),
        (np.zeros((4, 4, 3), np.int64), "dtype"),
        ([], "empty"),
    ],
)
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        proc.preprocess(bad)


def test_mixed_sizes_rejected(photo):
    with pytest.raises(ValueError, match="same size"):
        proc.preprocess([photo, photo[:10]])


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.touch()
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = [(empty, "empty"), (text, "not an image"), (truncated, "truncated"), (tmp_path / "x.png", "no such")]
    for path, match in cases:
        with pytest.raises(ImageLoadError, match=match):
            load_image(path)


def test_pad_and_crop_back():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded, size = pad_to_multiple(x, 4)
    assert padded.shape == (2, 3, 8, 8) and size == (5, 7)
    assert torch.equal(crop_to_size(padded, size), x)
    tiny, _ = pad_to_multiple(torch.ones(1, 3, 1, 1), 8)  # reflect impossible → replicate
    assert tiny.shape == (1, 3, 8, 8) and torch.all(tiny == 1)


def test_save_image_is_atomic_and_checks_format(tmp_path, photo):
    img = PIL.Image.fromarray(photo)
    save_image(img, tmp_path / "a" / "out.png")
    assert (tmp_path / "a" / "out.png").is_file()
    with pytest.raises(ValueError, match="extension"):
        save_image(img, tmp_path / "out.xyz")
    with pytest.raises(ValueError, match="alpha"):
        save_image(img.convert("RGBA"), tmp_path / "out.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no stray temporary files
