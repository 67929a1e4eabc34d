"""The tiled VAE of PASD's and SeeSR's scripts (``_init_tiled_vae``, multidiffusion-upscaler's ``VAEHook`` as shipped
in yangxy/PASD ``pasd/myutils/vaehook.py`` @ 396f9ac and cswry/SeeSR ``utils/vaehook.py`` @ 8edecc7), against
reference computations written from the original's description, not its code:

* the tile grid (``split_tiles``): hand-computed boxes for the scripts' tile sizes;
* one tile covering the input: the plain net, to float rounding;
* several tiles: the original's algorithm is not the plain net (the pads are smaller than the receptive field, the
  attention sees one tile, the shared statistics are pixel-weighted averages of the padded tiles' own variances and
  means), so the reference re-computes *it*: every tile runs through diffusers' own ``Encoder`` / ``Decoder`` forward,
  only the GroupNorms patched: GroupNorm ``k`` uses the averaged statistics of all tiles at ``k`` (gathered by
  running every tile up to ``k`` with the norms before it fixed), then the tiles' owned parts are stitched;
* the size threshold (a side above ``tile + 2 pad``), and the pipelines' automatic use, explicit sizes and ``0``.
"""

from __future__ import annotations

import math

import pytest
import torch
from stablesr_tiny import tiny_vae

import sr_diffusion.models.tiled_vae as tv
from sr_diffusion.models.tiled_vae import (
    best_tile_size,
    split_tiles,
    tiled_decode,
    tiled_decoder_forward,
    tiled_encode,
    tiled_encoder_forward,
    tiled_vae,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

# float32 tolerance for two orders of the same arithmetic through the tiny VAE: about 25 layers, each a sum of at most
# 9 · 64 products (a rounding walk of about sqrt(576) · 2^-24 ≈ 1.5e-6 relative per layer), and GroupNorm statistics
# computed two ways: 1e-4 of the output's scale leaves a margin of a few times that walk over 25 layers
RTOL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=RTOL * max(1.0, expected.abs().max().item()))


# ----------------------------------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------------------------------


def test_best_tile_size_rounds_up_to_the_largest_power_of_two_multiple_within_the_tile():
    assert best_tile_size(968, 1024) == 992  # 968 = 30·32 + 8 -> 992 <= 1024
    assert best_tile_size(960, 1024) == 960  # already a multiple of 32
    assert best_tile_size(1010, 1024) == 1024  # 1024 = 32·32
    assert best_tile_size(1017, 1020) == 1020  # 1024 > 1020; 16: 1024 > 1020; 8: 1024; 4: 1020
    assert best_tile_size(7, 7) == 7  # no multiple of 2 up to 7 above it: itself


def test_split_tiles_encoder_boxes_of_the_scripts_tile_size():
    # a 2000 x 3000 image, tiles of 1024, pad 32: ceil(1936 / 1024) = 2 rows, ceil(2936 / 1024) = 3 columns; cores of
    # ceil(1936 / 2) = 968 -> 992 and ceil(2936 / 3) = 979 -> 992 pixels, starting at the pad (32)
    inputs, outputs = split_tiles(2000, 3000, 1024, 32, 1 / 8)
    xs_in = [[0, 1056], [992, 2048], [1984, 3000]]
    ys_in = [[0, 1056], [992, 2000]]
    xs_out = [[0, 128], [128, 252], [252, 375]]  # owned [0, 1024], [1024, 2016], [2016, 3000] // 8
    ys_out = [[0, 128], [128, 250]]
    assert inputs == [x + y for y in ys_in for x in xs_in]
    assert outputs == [x + y for y in ys_out for x in xs_out]


def test_split_tiles_decoder_boxes_of_the_scripts_tile_size():
    # a 300 x 250 latent, tiles of 224, pad 11: 2 x 2 tiles; cores ceil(278 / 2) = 139 -> 160 rows, ceil(228 / 2) =
    # 114 -> 128 columns; owned parts times 8
    inputs, outputs = split_tiles(300, 250, 224, 11, 8)
    xs_in, ys_in = [[0, 150], [128, 250]], [[0, 182], [160, 300]]
    xs_out, ys_out = [[0, 1112], [1112, 2000]], [[0, 1368], [1368, 2400]]
    assert inputs == [x + y for y in ys_in for x in xs_in]
    assert outputs == [x + y for y in ys_out for x in xs_out]


# ----------------------------------------------------------------------------------------------------------------------
# The reference: diffusers' own forward on every tile, GroupNorms patched to the tiles' averaged statistics
# ----------------------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def reference_grid(height, width, tile, pad):
    """The original's grid, written out: ``[(read box, core box)]`` as ``(y1, y2, x1, x2)``, row by row."""

    def axis(n):
        count = max(math.ceil((n - 2 * pad) / tile), 1)
        size = math.ceil((n - 2 * pad) / count)
        for divider in (32, 16, 8, 4, 2):  # round up to the largest such multiple that stays within the tile
            up = -(-size // divider) * divider
            if up <= tile:
                size = up
                break
        cores = [(pad + j * size, min(pad + (j + 1) * size, n)) for j in range(count)]
        owned = [(a if a > pad else 0, b if b < n - pad else n) for a, b in cores]
        reads = [(max(0, a - pad), min(n, b + pad)) for a, b in cores]
        return list(zip(reads, owned))

    return [(ry + rx, oy + ox) for ry, oy in axis(height) for rx, ox in axis(width)]


def reference_tiled(net, x, tile, pad, is_decoder, factor):
    """The original's tiled forward of ``net`` on ``x`` (module docstring), with diffusers' ``net.forward``."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    grid = reference_grid(x.shape[2], x.shape[3], tile, pad)
    tiles = [x[:, :, r[0] : r[1], r[2] : r[3]] for r, _ in grid]
    stats = []  # per GroupNorm call k: (mean, var) of shape (N, G), averaged over the tiles

    def run(t, record):
        calls = []

        def norm_forward(m, h):
            k = len(calls)
            calls.append(k)
            g = h.reshape(h.shape[0], m.num_groups, -1)
            if k == len(stats):
                record.append((g.mean(dim=2), g.var(dim=2, unbiased=False), math.prod(h.shape[2:])))
                raise _Stop
            mean, var = stats[k]
            g = (g - mean[..., None]) / torch.sqrt(var[..., None] + m.eps)
            shape = (1, -1) + (1,) * (h.dim() - 2)
            return g.reshape(h.shape) * m.weight.reshape(shape) + m.bias.reshape(shape)

        for m in norms:
            m.forward = lambda h, m=m: norm_forward(m, h)
        try:
            return net(t)
        except _Stop:
            return None
        finally:
            for m in norms:
                del m.forward

    with torch.no_grad():
        while True:
            record = []
            outs = [run(t, record) for t in tiles]
            if not record:
                break
            n = torch.tensor([float(r[2]) for r in record])
            w = n / n.sum()
            stats.append((sum(wi * r[0] for wi, r in zip(w, record)), sum(wi * r[1] for wi, r in zip(w, record))))
        scale = (lambda v: v * factor) if is_decoder else (lambda v: v // factor)
        result = torch.zeros(x.shape[0], outs[0].shape[1], scale(x.shape[2]), scale(x.shape[3]))
        for (read, owned), out in zip(grid, outs):
            r, o = [scale(v) for v in read], [scale(v) for v in owned]
            result[:, :, o[0] : o[1], o[2] : o[3]] = out[:, :, o[0] - r[0] : o[1] - r[0], o[2] - r[2] : o[3] - r[2]]
    return result


def vae_and_inputs(widths):
    vae = tiny_vae(widths)
    f = 2 ** (len(widths) - 1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 52, 44, generator=g) * 2 - 1  # not a multiple of the tile: short last tiles
    z = torch.randn(2, 4, 13, 11, generator=g)
    return vae, f, x, z


@pytest.mark.parametrize("widths", [(32, 32, 64), (32, 32, 32, 32)], ids=["f4", "f8"])
def test_one_tile_is_the_plain_vae(widths):
    vae, _, x, z = vae_and_inputs(widths)
    with torch.no_grad():
        close(tiled_encoder_forward(vae.encoder, x, 1000), vae.encoder(x))
        close(tiled_decoder_forward(vae.decoder, z, 1000), vae.decoder(z))


@pytest.mark.parametrize("widths", [(32, 32, 64), (32, 32, 32, 32)], ids=["f4", "f8"])
def test_several_tiles_are_the_originals_algorithm(widths):
    vae, f, x, z = vae_and_inputs(widths)
    with torch.no_grad():
        plain_enc, plain_dec = vae.encoder(x), vae.decoder(z)
        for tile, pad in ((16, 8), (24, 4)):  # 3 x 3 and 2 x 2 tiles of the 52 x 44 image
            tiled = tiled_encoder_forward(vae.encoder, x, tile, pad)
            close(tiled, reference_tiled(vae.encoder, x, tile, pad, False, f))
            assert (tiled - plain_enc).abs().max() > 100 * RTOL  # the tiling is real: not the plain encoder
        for tile, pad in ((4, 2), (6, 1)):
            tiled = tiled_decoder_forward(vae.decoder, z, tile, pad)
            close(tiled, reference_tiled(vae.decoder, z, tile, pad, True, f))
            assert (tiled - plain_dec).abs().max() > 100 * RTOL


def test_offloading_the_waiting_tiles_changes_nothing():
    vae, _, x, z = vae_and_inputs((32, 32, 64))
    a = tiled_decoder_forward(vae.decoder, z, 4, 2, offload=True)
    torch.testing.assert_close(a, tiled_decoder_forward(vae.decoder, z, 4, 2, offload=False), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# The hook: the original's threshold
# ----------------------------------------------------------------------------------------------------------------------


def spy(monkeypatch) -> list[tuple[str, tuple, int, int]]:
    """Record the tiled forwards the hook runs: ``(net, input shape, tile, pad)``."""
    calls = []
    for name in ("tiled_encoder_forward", "tiled_decoder_forward"):
        real = getattr(tv, name)

        def wrapped(net, x, tile, pad, real=real, name=name):
            calls.append((name.split("_")[1], tuple(x.shape), tile, pad))
            return real(net, x, tile, pad)

        monkeypatch.setattr(tv, name, wrapped)
    return calls


def test_tiled_vae_tiles_only_above_tile_plus_two_pads_and_restores_the_forwards(monkeypatch):
    vae, _, x, z = vae_and_inputs((32, 32, 64))
    calls = spy(monkeypatch)
    with torch.no_grad():
        plain_moments = vae.encode(x).latent_dist.parameters
        plain = vae.decode(z).sample
        # 52 = 44 + 2·4 and 13 = 9 + 2·2: at the threshold, the plain nets, bit for bit
        with tiled_vae(vae, 44, 9, encoder_pad=4, decoder_pad=2):
            torch.testing.assert_close(vae.encode(x).latent_dist.parameters, plain_moments, rtol=0, atol=0)
            torch.testing.assert_close(vae.decode(z).sample, plain, rtol=0, atol=0)
        assert calls == []
        # one pixel above: tiled (the quant convs outside the tiles, as in vae.encode / vae.decode)
        with tiled_vae(vae, 43, 8, encoder_pad=4, decoder_pad=2):
            moments = vae.encode(x).latent_dist.parameters
            decoded = vae.decode(z).sample
        assert calls == [("encoder", (2, 3, 52, 44), 43, 4), ("decoder", (2, 4, 13, 11), 8, 2)]
        torch.testing.assert_close(
            moments, vae.quant_conv(tiled_encoder_forward(vae.encoder, x, 43, 4)), rtol=0, atol=0
        )
        torch.testing.assert_close(
            decoded, tiled_decoder_forward(vae.decoder, vae.post_quant_conv(z), 8, 2), rtol=0, atol=0
        )
        # the forwards are the modules' own again
        assert "forward" not in vae.encoder.__dict__ and "forward" not in vae.decoder.__dict__
        torch.testing.assert_close(vae.decode(z).sample, plain, rtol=0, atol=0)
        # the defaults are the scripts' sizes and pads: a 1088-pixel side is not tiled, 1089 is (checked on the rule)
        assert not tv.needs_tiling(1088, 500, 1024, tv.ENCODER_PAD) and tv.needs_tiling(500, 1089, 1024, 32)
        assert not tv.needs_tiling(246, 246, 224, tv.DECODER_PAD) and tv.needs_tiling(247, 10, 224, 11)
        # the convenience functions
        torch.testing.assert_close(tiled_encode(vae, x, 43, pad=4).parameters, moments, rtol=0, atol=0)
        torch.testing.assert_close(tiled_decode(vae, z, 8, pad=2), decoded, rtol=0, atol=0)


def test_tiled_vae_restores_a_forward_already_wrapped_on_the_instance():
    # e.g. accelerate's offload hooks set ``module.forward`` on the instance: it is kept underneath and put back
    vae, _, x, z = vae_and_inputs((32, 32, 64))
    seen = []
    plain = vae.decoder.forward

    def wrapped(sample, *args, **kwargs):
        seen.append(tuple(sample.shape))
        return plain(sample, *args, **kwargs)

    vae.decoder.forward = wrapped
    with torch.no_grad(), tiled_vae(vae, None, 224):
        vae.decode(z)  # below the threshold: the wrapped forward runs
    assert seen == [(2, 4, 13, 11)] and vae.decoder.forward is wrapped and "forward" not in vae.encoder.__dict__


# ----------------------------------------------------------------------------------------------------------------------
# The pipelines: automatic at the originals' threshold, explicit sizes, 0 = never
# ----------------------------------------------------------------------------------------------------------------------


def make(kind: str):
    from pasd_tiny import tiny_components as pasd_components
    from seesr_tiny import tiny_components as seesr_components

    from sr_diffusion.pipelines.pasd import PASDPipeline
    from sr_diffusion.pipelines.seesr import SeeSRPipeline

    pipe = PASDPipeline(**pasd_components()) if kind == "pasd" else SeeSRPipeline(**seesr_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["pasd", "seesr"])
def test_pipelines_tile_the_vae_at_the_originals_threshold_and_0_turns_it_off(kind, monkeypatch):
    from sd_pipeline_common import run
    from stablesr_tiny import lr_image

    pipe = make(kind)
    assert pipe.AUTO_VAE_TILE == (1024, 224) and (tv.ENCODER_PAD, tv.DECODER_PAD) == (32, 11)  # the scripts'
    lr = lr_image(4, (8, 12))  # x4: a 32 x 48 image (encoded for the LR start), an 8 x 12 latent (f = 4)
    calls = spy(monkeypatch)
    whole = run(pipe, image=lr, vae_tile_size=0)
    torch.testing.assert_close(run(pipe, image=lr), whole, rtol=0, atol=0)  # far below the scripts' sizes
    assert calls == []
    # the thresholds made small for the tiny VAE: pads 4 / 1, and tiles that reach the image's side with them
    monkeypatch.setattr(tv, "ENCODER_PAD", 4)
    monkeypatch.setattr(tv, "DECODER_PAD", 1)
    monkeypatch.setattr(pipe, "AUTO_VAE_TILE", (40, 10))  # 48 = 40 + 2·4, 12 = 10 + 2·1: not above, not tiled
    torch.testing.assert_close(run(pipe, image=lr), whole, rtol=0, atol=0)
    assert calls == []
    monkeypatch.setattr(pipe, "AUTO_VAE_TILE", (39, 9))  # one pixel less: both tiled
    auto = run(pipe, image=lr)
    assert calls == [("encoder", (1, 3, 32, 48), 39, 4), ("decoder", (1, 4, 8, 12), 9, 1)]
    assert (auto - whole).abs().max() > 1e-3
    # an explicit pair is the same as automatic with those sizes; 0 never tiles; an int n tiles both in n image pixels
    torch.testing.assert_close(run(pipe, image=lr, vae_tile_size=(39, 9)), auto, rtol=0, atol=0)
    calls.clear()
    torch.testing.assert_close(run(pipe, image=lr, vae_tile_size=0), whole, rtol=0, atol=0)
    assert calls == []
    run(pipe, image=lr, vae_tile_size=32)
    assert calls == [("encoder", (1, 3, 32, 48), 32, 4), ("decoder", (1, 4, 8, 12), 8, 1)]
    for bad in (-4, 6, True, (0, 8), (8,), 8.0):
        with pytest.raises(ValueError, match="vae_tile_size must be"):
            run(pipe, image=lr, vae_tile_size=bad)
