"""Extra cross-attention layers next to the blocks of a diffusers UNet or ControlNet, without forking either.

Two prompt-guided SR methods add a second cross-attention after the blocks of a Stable Diffusion UNet, each a
diffusers ``Transformer2DModel`` (its own GroupNorm, ``proj_in``, transformer blocks, ``proj_out`` and residual):

- **PASD** (Yang et al., ECCV 2024, Sec. 3.1, "pixel-aware cross-attention", PACA): in every *up* block, after each
  layer (the cross-attention ``attentions[j]`` of a ``CrossAttnUpBlock2D``, the resnet ``resnets[j]`` of a plain
  ``UpBlock2D``), the feature map ``h`` attends to the ControlNet's down-block residual ``y_k`` of the same skip
  connection, flattened to ``(B, H·W, C_k)`` tokens: ``h ← PACA(h, y_k)``. Released name: ``up_blocks.{i}.pixel_
  attentions.{j}``; the context width is that layer's skip channels (cross-attention up blocks) or its output channels
  (plain up blocks), as the original ``unet_2d_blocks.py`` builds them.
- **SeeSR** (Wu et al., CVPR 2024, Sec. 3.2): after every text cross-attention ``attentions[j]`` of the down, middle
  and up blocks (UNet) or the down and middle blocks (its ControlNet), ``h`` attends to the degradation-aware soft
  prompts (image tokens ``(B, N, D)``): ``h ← ImageAttn(h, p_soft)``. Released name: ``{block}.image_attentions.{j}``,
  with the block's own attention settings and ``cross_attention_dim = D``.

:class:`BlockAttentions` holds those layers under the released parameter names (``up_blocks.1.pixel_attentions.0.
transformer_blocks.0.attn2.to_k.weight``, ``mid_block.image_attentions.0.proj_in.weight``, ...), so the extra keys of
a released ``unet/`` or ``controlnet/`` folder load into it as they are, and the base keys into diffusers' own
classes. :meth:`BlockAttentions.attach` registers, for the duration of a ``with`` block, a forward hook on each hooked
layer that replaces its output ``h`` by ``layer(h, encoder_hidden_states=context)`` — exactly where the original
blocks call it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

__all__ = ["BlockAttentions"]

#: the settings of one extra layer (the ``layers`` entries of the config), besides where it goes
_LAYER_KEYS = (
    "in_channels",
    "num_attention_heads",
    "attention_head_dim",
    "cross_attention_dim",
    "num_layers",
    "norm_num_groups",
    "use_linear_projection",
    "only_cross_attention",
    "upcast_attention",
)
_BLOCK_LISTS = ("down_blocks", "up_blocks")


class _BlockSlot(nn.Module):
    """The extra layers of one block, as an attribute named after them (``pixel_attentions``, ``image_attentions``),
    so that names read ``up_blocks.{i}.{name}.{j}.…``."""

    def __init__(self, name: str, layers: Sequence[nn.Module]):
        super().__init__()
        setattr(self, name, nn.ModuleList(layers))


def _block_path(block: str) -> tuple[str, int | None]:
    """``"up_blocks.1"`` → ``("up_blocks", 1)``; ``"mid_block"`` → ``("mid_block", None)``."""
    if block == "mid_block":
        return block, None
    kind, _, index = block.partition(".")
    if kind not in _BLOCK_LISTS or not index.isdigit():
        raise ValueError(f"block must be 'mid_block', 'down_blocks.<i>' or 'up_blocks.<i>', got {block!r}")
    return kind, int(index)


def _attention_settings(attention: nn.Module) -> dict[str, Any]:
    """The settings of an existing diffusers ``Transformer2DModel`` that an extra layer beside it copies."""
    if not isinstance(attention, Transformer2DModel):
        raise ValueError(f"expected a diffusers Transformer2DModel, got {type(attention).__name__}")
    config = attention.config
    return {
        "in_channels": int(config.in_channels),
        "num_attention_heads": int(config.num_attention_heads),
        "attention_head_dim": int(config.attention_head_dim),
        "num_layers": int(config.num_layers),
        "norm_num_groups": int(config.norm_num_groups),
        "use_linear_projection": bool(config.use_linear_projection),
        "only_cross_attention": bool(config.only_cross_attention),
        "upcast_attention": bool(config.upcast_attention),
    }


def _per_block(value: Any, count: int) -> list:
    """A UNet config entry given as one value or one per block → one per block."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class BlockAttentions(ModelMixin, ConfigMixin):
    r"""Extra ``Transformer2DModel`` cross-attention layers placed after layers of a UNet's / ControlNet's blocks.

    Build one for a model with :meth:`after_cross_attention` (SeeSR) or :meth:`pasd_pixel_attentions` (PASD); the
    constructor takes the explicit layout (what ``from_pretrained`` reads back).

    Args:
        name (`str`): the attribute the layers sit under in each block (``"image_attentions"``,
            ``"pixel_attentions"``): parameter names read ``{block}.{name}.{index}.…``.
        layers (`list[dict]`): one entry per extra layer, in the order the model runs them: ``block``
            (``"down_blocks.<i>"``, ``"mid_block"``, ``"up_blocks.<i>"``), ``index`` (``j``, counted from 0 without
            gaps within a block), ``after`` (``"attentions"`` or ``"resnets"``: the hooked layer is
            ``{block}.{after}.{index}`` of the model) and the ``Transformer2DModel`` settings ``in_channels``,
            ``num_attention_heads``, ``attention_head_dim``, ``cross_attention_dim`` (the context width),
            ``num_layers``, ``norm_num_groups``, ``use_linear_projection``, ``only_cross_attention``,
            ``upcast_attention``.
    """

    @register_to_config
    def __init__(self, name: str = "extra_attentions", layers: Sequence[Mapping[str, Any]] = ()):
        super().__init__()
        if not name.isidentifier():
            raise ValueError(f"name must be a Python identifier, got {name!r}")
        specs = [dict(layer) for layer in layers]
        grouped: dict[str, list[dict]] = {}
        for spec in specs:
            missing = [k for k in ("block", "index", "after", *_LAYER_KEYS) if k not in spec]
            if missing:
                raise ValueError(f"layer {spec} lacks {', '.join(missing)}")
            if spec["after"] not in ("attentions", "resnets"):
                raise ValueError(f"after must be 'attentions' or 'resnets', got {spec['after']!r}")
            _block_path(spec["block"])
            grouped.setdefault(spec["block"], []).append(spec)
        for block, group in grouped.items():
            if sorted(int(s["index"]) for s in group) != list(range(len(group))):
                raise ValueError(f"the layers of {block} must have indices 0 … {len(group) - 1} without gaps")

        def build(spec: Mapping[str, Any]) -> Transformer2DModel:
            return Transformer2DModel(**{k: spec[k] for k in _LAYER_KEYS})

        def slot(block: str) -> _BlockSlot:
            group = sorted(grouped.get(block, []), key=lambda s: int(s["index"]))
            return _BlockSlot(name, [build(s) for s in group])

        for kind in _BLOCK_LISTS:
            indices = [_block_path(b)[1] for b in grouped if b.startswith(kind)]
            count = max(indices) + 1 if indices else 0
            setattr(self, kind, nn.ModuleList([slot(f"{kind}.{i}") for i in range(count)]))
        self.mid_block = slot("mid_block") if "mid_block" in grouped else None
        self._specs = specs

    # ------------------------------------------------------------------------------------------------------------------
    # Builders
    # ------------------------------------------------------------------------------------------------------------------

    @classmethod
    def after_cross_attention(
        cls, model: nn.Module, name: str = "image_attentions", context_dim: int = 1024
    ) -> BlockAttentions:
        """One layer after every ``Transformer2DModel`` in ``attentions`` of the down, middle and up blocks of
        ``model`` (a ``UNet2DConditionModel`` or a ``ControlNetModel``, which has no up blocks), with that
        attention's settings and ``cross_attention_dim = context_dim`` (SeeSR's image cross-attention)."""
        layers = []
        blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(getattr(model, "down_blocks", []))]
        if getattr(model, "mid_block", None) is not None:
            blocks.append(("mid_block", model.mid_block))
        blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(model, "up_blocks", None) or [])]
        for block, module in blocks:
            attentions = getattr(module, "attentions", None) or []
            if not all(isinstance(a, Transformer2DModel) for a in attentions):
                continue  # self-attention only (UNet2DModel's mid block): no text cross-attention to follow
            for j, attention in enumerate(attentions):
                settings = _attention_settings(attention)
                layers.append({"block": block, "index": j, "after": "attentions", **settings})
                layers[-1]["cross_attention_dim"] = int(context_dim)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no cross-attention blocks to add {name} after")
        return cls(name=name, layers=layers)

    @classmethod
    def pasd_pixel_attentions(cls, unet: nn.Module, name: str = "pixel_attentions") -> BlockAttentions:
        """PASD's pixel-aware cross-attention layers for an SD ``UNet2DConditionModel``: in up block ``i`` one per
        layer ``j``, after ``attentions[j]`` (cross-attention blocks, with that attention's settings, context width
        = the layer's skip channels) or ``resnets[j]`` (plain blocks: the block's heads, ``transformer_layers_per_
        block`` and the UNet's ``use_linear_projection`` / ``upcast_attention``, context width = its output
        channels), as the original ``CrossAttnUpBlock2D`` / ``UpBlock2D``."""
        config = unet.config
        widths = list(config.block_out_channels)
        levels = len(widths)
        heads = config.num_attention_heads or config.attention_head_dim
        heads_up = list(reversed(_per_block(heads, levels)))
        layers_up = list(reversed(_per_block(config.transformer_layers_per_block, levels)))
        only_cross_up = list(reversed(_per_block(config.only_cross_attention, levels)))
        reversed_widths = list(reversed(widths))
        layers = []
        for i, block in enumerate(unet.up_blocks):
            out_channels = reversed_widths[i]
            in_channels = reversed_widths[min(i + 1, levels - 1)]
            attentions = getattr(block, "attentions", None)
            for j in range(len(block.resnets)):
                skip_channels = in_channels if j == len(block.resnets) - 1 else out_channels
                if attentions:
                    settings = _attention_settings(attentions[j])
                    spec = {"after": "attentions", **settings, "cross_attention_dim": skip_channels}
                else:
                    n_layers = layers_up[i]
                    spec = {
                        "after": "resnets",
                        "in_channels": out_channels,
                        "num_attention_heads": int(heads_up[i]),
                        "attention_head_dim": out_channels // int(heads_up[i]),
                        "cross_attention_dim": out_channels,
                        "num_layers": int(n_layers if isinstance(n_layers, int) else n_layers[j]),
                        "norm_num_groups": int(config.norm_num_groups),
                        "use_linear_projection": bool(config.use_linear_projection),
                        "only_cross_attention": bool(only_cross_up[i]),
                        "upcast_attention": bool(config.upcast_attention),
                    }
                layers.append({"block": f"up_blocks.{i}", "index": j, **spec})
        return cls(name=name, layers=layers)

    # ------------------------------------------------------------------------------------------------------------------
    # Placement
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def positions(self) -> list[str]:
        """``"{block}.{name}.{index}"`` of every layer, in the order the model runs them (down, middle, up)."""
        return [f"{s['block']}.{self.config.name}.{s['index']}" for s in self._ordered_specs()]

    @property
    def layer_specs(self) -> list[dict[str, Any]]:
        """The settings of every layer (copies of the ``layers`` config entries: ``block``, ``index``, ``after``, the
        ``Transformer2DModel`` settings), in the order the model runs them (down, middle, up), aligned with
        :attr:`positions`."""
        return [dict(spec) for spec in self._ordered_specs()]

    def _ordered_specs(self) -> list[dict]:
        rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

        def key(spec):
            kind, i = _block_path(spec["block"])
            return rank[kind], i or 0, int(spec["index"])

        return sorted(self._specs, key=key)

    def layer(self, spec: Mapping[str, Any]) -> Transformer2DModel:
        kind, i = _block_path(spec["block"])
        slot = self.mid_block if i is None else getattr(self, kind)[i]
        return getattr(slot, self.config.name)[int(spec["index"])]

    @staticmethod
    def _hooked(model: nn.Module, spec: Mapping[str, Any]) -> nn.Module | None:
        kind, i = _block_path(spec["block"])
        try:
            block = model.mid_block if i is None else getattr(model, kind)[i]
            return getattr(block, spec["after"])[int(spec["index"])]
        except (AttributeError, IndexError, TypeError):
            return None

    def check_model(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` unless every layer has its hooked layer in ``model`` with the right width."""
        for spec in self._ordered_specs():
            where = f"{spec['block']}.{spec['after']}.{spec['index']}"
            hooked = self._hooked(model, spec)
            if hooked is None:
                raise ValueError(
                    f"{type(model).__name__} has no {where}, which {self.config.name} attaches to: the add-on was "
                    "built for a model with other blocks"
                )
            width = getattr(getattr(hooked, "config", None), "in_channels", None)
            if width is None:
                width = getattr(hooked, "out_channels", None)
            if width is not None and int(width) != int(spec["in_channels"]):
                raise ValueError(
                    f"{where} of {type(model).__name__} has {width} channels but the {self.config.name} layer after it "
                    f"takes {spec['in_channels']}: the add-on was built for a model of another width"
                )

    def _contexts(self, context: Any) -> list[torch.Tensor]:
        positions = self.positions
        if isinstance(context, torch.Tensor):
            return [context] * len(positions)
        if isinstance(context, Mapping):
            missing = [p for p in positions if p not in context]
            if missing:
                raise ValueError(f"no {self.config.name} context for {', '.join(missing)}")
            return [context[p] for p in positions]
        if isinstance(context, Sequence):
            if len(context) != len(positions):
                raise ValueError(
                    f"got {len(context)} {self.config.name} contexts for {len(positions)} layers ({positions})"
                )
            return list(context)
        raise ValueError(f"context must be a tensor, a dict or a sequence of tensors, got {type(context).__name__}")

    @staticmethod
    def _tokens(context: torch.Tensor, spec: Mapping[str, Any], batch: int, where: str) -> torch.Tensor:
        if context.ndim == 4:  # (B, C, H, W) map → (B, H·W, C) tokens
            context = context.flatten(2).transpose(1, 2)
        if context.ndim != 3 or context.shape[-1] != spec["cross_attention_dim"]:
            raise ValueError(
                f"the context for {where} must be (B, L, {spec['cross_attention_dim']}) tokens or (B, "
                f"{spec['cross_attention_dim']}, H, W) maps, got {tuple(context.shape)}"
            )
        if batch % context.shape[0]:
            raise ValueError(f"the context for {where} has batch {context.shape[0]}, the model's input {batch}")
        repeats = batch // context.shape[0]
        return context.repeat(repeats, 1, 1) if repeats > 1 else context

    @contextlib.contextmanager
    def attach(self, model: nn.Module, context: Any) -> Iterator[None]:
        """Within the block, every call of ``model`` runs the extra layers with ``context``.

        Args:
            model: the ``UNet2DConditionModel`` / ``ControlNetModel`` these layers were built for.
            context: what the layers attend to: a tensor (every layer), a dict keyed by :attr:`positions` or a
                sequence aligned with them; each ``(B, L, D)`` tokens or ``(B, D, H, W)`` maps (flattened to
                ``H·W`` tokens). ``B`` may divide the model's batch (the context is then repeated, e.g. for both
                halves of classifier-free guidance).
        """
        specs = self._ordered_specs()
        contexts = self._contexts(context)
        handles = []

        def make_hook(layer: Transformer2DModel, ctx: torch.Tensor, spec: Mapping[str, Any], where: str):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                tokens = self._tokens(ctx, spec, hidden.shape[0], where)
                dtype = layer.proj_in.weight.dtype
                out = layer(hidden.to(dtype), encoder_hidden_states=tokens.to(dtype), return_dict=False)[0]
                out = out.to(hidden.dtype)
                if isinstance(output, tuple):
                    return (out, *output[1:])
                if hasattr(output, "sample"):
                    output.sample = out
                    return output
                return out

            return hook

        try:
            for spec, ctx in zip(specs, contexts):
                where = f"{spec['block']}.{self.config.name}.{spec['index']}"
                hooked = self._hooked(model, spec)
                if hooked is None:
                    raise ValueError(f"{type(model).__name__} has no {spec['block']}.{spec['after']}.{spec['index']}")
                handles.append(hooked.register_forward_hook(make_hook(self.layer(spec), ctx, spec, where)))
            yield
        finally:
            for handle in handles:
                handle.remove()
