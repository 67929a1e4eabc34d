"""Low-rank adapters (LoRA) for the linear layers of a frozen diffusers UNet, held outside the UNet.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, Sec. 4.1: a frozen weight
``W ∈ R^{d_out × d_in}`` is adapted as ``W' = W + (alpha / r) · B A`` with ``A ∈ R^{r × d_in}`` (Kaiming-uniform, as
``nn.Linear`` and peft initialise it), ``B ∈ R^{d_out × r}`` (zero, so a fresh adapter changes nothing) and the scale
``alpha / r`` (peft's convention; ``alpha`` defaults to ``r``: scale 1). For an input ``x`` ``(..., d_in)`` the adapted
layer returns ``W x + b + (alpha / r) · B (A x)`` ``(..., d_out)``.

The prompt-guided SR methods (StableSR, PASD, SeeSR) keep their SD base frozen; this add-on lets their training adapt
the base UNet too without forking or mutating it: :class:`UNetLoRA` is a ``ModelMixin`` of its own (the shared
trainer checkpoints and averages only its parameters), and

- :meth:`UNetLoRA.attach` adds ``scale · B(A(x))`` to each target layer's output through forward hooks, for the
  duration of a ``with`` block (the UNet's weights are untouched);
- :meth:`UNetLoRA.fuse_into` adds ``scale · B @ A`` to the target weights in place (for export: a self-contained UNet);
- :meth:`UNetLoRA.peft_state_dict` gives the adapter in the diffusers / peft LoRA layout (``{path}.lora_A.weight``
  ``(r, d_in)``, ``{path}.lora_B.weight`` ``(d_out, r)``) that ``StableDiffusionLoraLoaderMixin.save_lora_weights(dir,
  unet_lora_layers=...)`` writes and ``pipe.load_lora_weights(dir)`` reads. The scale is folded into ``lora_B``: a file
  without alphas loads with peft's scale 1, so the loaded LoRA gives the hooked output for any ``alpha``.

Default targets: the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention in the UNet
(self- and cross-attention of the transformer blocks), the usual choice for SD LoRAs (diffusers'
``train_text_to_image_lora.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

__all__ = ["DEFAULT_LORA_TARGETS", "LoRALayer", "UNetLoRA"]

#: the attention projections of every diffusers ``Attention``
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALayer(nn.Module):
    """``x ↦ scale · B(A(x))`` for ``x`` ``(..., in_features)``: ``lora_A`` ``(rank, in_features)``, ``lora_B``
    ``(out_features, rank)``, both without bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.scale = scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A`` Kaiming-uniform (``a = sqrt(5)``, peft's default), ``B`` zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))

    def delta_weight(self) -> torch.Tensor:
        """``scale · B @ A`` ``(out_features, in_features)``."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)


class UNetLoRA(ModelMixin, ConfigMixin):
    r"""LoRA adapters for chosen ``nn.Linear`` layers of a (frozen) UNet; see the module docstring.

    Args:
        targets: ``{path: [in_features, out_features]}``, ``path`` the layer's name in ``unet.named_modules()``
            (e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``). Build it with :meth:`for_unet`.
        rank: ``r``, the adapters' rank (>= 1).
        alpha: ``alpha`` of the scale ``alpha / r`` (default ``r``: scale 1).

    Parameters: ``layers.{k}.lora_A.weight`` ``(r, in)`` and ``layers.{k}.lora_B.weight`` ``(out, r)`` for the
    ``k``-th target in the sorted order of the paths.
    """

    @register_to_config
    def __init__(self, targets: Mapping[str, Sequence[int]] | None = None, rank: int = 4, alpha: float | None = None):
        super().__init__()
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
        # sorted: the saved config's JSON sorts its keys, and the layers' order must survive a save / load
        targets = {path: (int(shape[0]), int(shape[1])) for path, shape in sorted(dict(targets or {}).items())}
        if not targets:
            raise ValueError("UNetLoRA needs at least one target layer (build it with UNetLoRA.for_unet)")
        self.targets = targets
        self.paths = list(targets)
        self.scale = float(alpha if alpha is not None else rank) / rank
        self.layers = nn.ModuleList(LoRALayer(n_in, n_out, int(rank), self.scale) for n_in, n_out in targets.values())

    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        rank: int,
        alpha: float | None = None,
        target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    ) -> UNetLoRA:
        """Fresh adapters (``A`` random, ``B`` zero) for every ``nn.Linear`` of ``unet`` whose name is one of
        ``target_modules`` or ends with ``.{target}``; a ``ValueError`` for a target that names no linear layer."""
        if isinstance(target_modules, str):
            target_modules = (target_modules,)
        if not target_modules:
            raise ValueError("target_modules: give at least one layer name (e.g. 'to_q')")
        found: dict[str, list[int]] = {}
        matched: set[str] = set()
        for name, module in unet.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            hits = [t for t in target_modules if name == t or name.endswith(f".{t}")]
            if hits:
                matched.update(hits)
                found[name] = [module.in_features, module.out_features]
        unknown = [t for t in target_modules if t not in matched]
        if unknown:
            raise ValueError(f"target_modules: no nn.Linear of the UNet is named {', '.join(map(repr, unknown))}")
        return cls(targets=found, rank=rank, alpha=alpha)

    # ------------------------------------------------------------------------------------------------------------------
    # Placement
    # ------------------------------------------------------------------------------------------------------------------

    def _linears(self, unet: nn.Module) -> list[nn.Linear]:
        """The target layers of ``unet``, checked against the recorded shapes."""
        modules = dict(unet.named_modules())
        linears = []
        for path, (in_features, out_features) in self.targets.items():
            module = modules.get(path)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"the UNet has no linear layer {path} (the LoRA was built for another UNet)")
            if (module.in_features, module.out_features) != (in_features, out_features):
                raise ValueError(
                    f"the UNet's {path} maps {module.in_features} -> {module.out_features} features, the LoRA "
                    f"{in_features} -> {out_features}"
                )
            linears.append(module)
        return linears

    @contextlib.contextmanager
    def attach(self, unet: nn.Module) -> Iterator[None]:
        """Within the block, each target layer of ``unet`` returns ``W x + b + scale · B(A(x))`` (forward hooks,
        removed on exit; the UNet's own parameters are not changed)."""
        handles = []

        def make_hook(layer: LoRALayer):
            def hook(module, args, output):
                return output + layer(args[0]).to(output.dtype)

            return hook

        try:
            for linear, layer in zip(self._linears(unet), self.layers):
                handles.append(linear.register_forward_hook(make_hook(layer)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def fuse_into(self, unet: nn.Module) -> nn.Module:
        """``W ← W + scale · B @ A`` for every target of ``unet``, in place (in ``W``'s dtype); returns ``unet``."""
        for linear, layer in zip(self._linears(unet), self.layers):
            delta = layer.delta_weight().to(device=linear.weight.device, dtype=torch.float32)
            linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
        return unet

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """``{f"{path}.lora_A.weight": A (r, in), f"{path}.lora_B.weight": scale · B (out, r)}`` (detached copies):
        the diffusers / peft layout of ``save_lora_weights(dir, unet_lora_layers=...)``, the scale folded into
        ``lora_B`` (peft loads a file without alphas with scale 1)."""
        state = {}
        for path, layer in zip(self.paths, self.layers):
            state[f"{path}.lora_A.weight"] = layer.lora_A.weight.detach().clone().contiguous()
            state[f"{path}.lora_B.weight"] = (layer.scale * layer.lora_B.weight.detach()).contiguous()
        return state
