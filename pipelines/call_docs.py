"""The ``__call__`` argument paragraphs that every SR pipeline shares, written once.

A pipeline's ``__call__`` docstring names a shared paragraph with a placeholder line in its ``Args:`` section::

    output_type: {output_type}
    lr_consistency: {lr_consistency} Default False.

and :func:`shared_call_docs` replaces each with :data:`SHARED_CALL_ARGS`' paragraph (anything after the placeholder
follows it), wrapped at 120 columns, so ``help(pipe)`` and the rendered docs read as if it were written out.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

__all__ = ["SHARED_CALL_ARGS", "shared_call_docs"]

SHARED_CALL_ARGS = {
    "image": "PIL image, path, numpy array, (C,H,W)/(N,C,H,W) tensor in [0,1], or a list of them (equal sizes). An "
    "alpha channel is carried through, upscaled separately with bicubic interpolation.",
    "output_type": '``"pil"``, ``"np"`` or ``"pt"``.',
    "return_dict": "return an ``SRPipelineOutput`` rather than a tuple.",
    "generator": "a ``torch.Generator``, or a list with one per image: with a list, image ``i`` is sampled with "
    "``generator[i]`` alone, so a batch gives the images it would give one at a time.",
    "callback_on_step_end_tensor_inputs": 'which tensors ``callback_kwargs`` holds (default ``["latents"]``).',
    "color_fix": '``"none"``, ``"adain"`` or ``"wavelet"``: correct the output\'s colours towards the LR image '
    "(:func:`sr_diffusion.color_fix.color_fix`); changes colours only, not detail.",
    "lr_consistency": "replace the output by its projection onto the images whose MATLAB-bicubic downsampling by "
    "``upscale`` is the input (:func:`sr_diffusion.fidelity.project_to_lr`: the minimum-norm change, clamped to "
    "[0, 1]), so that the output explains its input exactly; after the colour fix, on the whole image when tiling; "
    "the alpha channel is unaffected.",
    "tile_overlap": "the overlap of neighbouring tiles, in LR pixels (default 32; see ``tile_size``).",
    "eta": "DDIM's η (0: deterministic DDIM; 1: DDPM-like), passed to schedulers whose ``step`` takes it.",
    "vae_tile_size": "the VAE's own tiling (:func:`~sr_diffusion.models.tiled_vae.tiled_vae`: the original's "
    "``_init_tiled_vae``, GroupNorm statistics shared across tiles). ``None`` (default): automatic as the original, "
    "encoder tiles of 1024 image pixels for an image above 1088 pixels a side, decoder tiles of 224 latent pixels "
    "for a latent above 246 a side; ``0``: never; an int: tiles of ``vae_tile_size`` image pixels for both; a pair: "
    "``(encoder tile in image pixels, decoder tile in latent pixels)``.",
}

_PLACEHOLDER = re.compile(r"^(?P<indent>\s*)(?P<name>\w+): \{(?P<key>\w+)\}(?P<rest>.*)$")

F = TypeVar("F", bound=Callable)


def shared_call_docs(fn: F) -> F:
    """Fill the ``name: {key}`` placeholder lines of ``fn.__doc__`` (see the module); an unknown key is an error."""
    lines = []
    for line in (fn.__doc__ or "").splitlines():
        match = _PLACEHOLDER.match(line)
        if match is None:
            lines.append(line)
            continue
        key, indent = match["key"], match["indent"]
        if key not in SHARED_CALL_ARGS:
            raise KeyError(f"{fn.__qualname__}: no shared argument paragraph {key!r}")
        text = f"{match['name']}: {SHARED_CALL_ARGS[key]}{match['rest']}"
        lines += textwrap.wrap(text, width=120, initial_indent=indent, subsequent_indent=indent + "    ")
    fn.__doc__ = "\n".join(lines)
    return fn
