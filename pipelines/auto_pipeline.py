"""``AutoSRPipeline``: load any saved sr_diffusion pipeline folder without knowing its class.

``diffusers.DiffusionPipeline.from_pretrained(dir)`` only resolves ``_class_name`` among diffusers'
own pipelines. This reads ``model_index.json`` and dispatches to our class.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from sr_diffusion import registry

__all__ = ["AutoSRPipeline", "PIPELINE_CLASSES"]


class _RegisteredPipelines(Mapping):
    """``{_class_name: class}`` of every method in :mod:`sr_diffusion.registry`, read at each use (a method registered
    later is found); a class is imported when it is looked up."""

    def __getitem__(self, name: str) -> type:
        return registry.resolve(registry.pipeline_classes()[name])

    def __iter__(self) -> Iterator[str]:
        return iter(registry.pipeline_classes())

    def __len__(self) -> int:
        return len(registry.pipeline_classes())

    def __contains__(self, name: object) -> bool:
        return name in registry.pipeline_classes()

    def __repr__(self) -> str:
        return f"PIPELINE_CLASSES({', '.join(sorted(self))})"


#: Every pipeline class of the registered methods, by the ``_class_name`` it writes into ``model_index.json``.
PIPELINE_CLASSES: Mapping[str, type] = _RegisteredPipelines()


def _import_own_component_modules(model_index: dict) -> None:
    """Import the modules of components that live in this package, so diffusers can resolve them.

    diffusers (>= 0.42) resolves a component recorded under a module path outside its own libraries
    only from ``sys.modules``: it will not import a module because a saved folder names it. Modules of
    this package are ours to import; any other name is left to diffusers (and its error message).
    """
    for value in model_index.values():
        if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
            if value[0] == "sr_diffusion" or value[0].startswith("sr_diffusion."):
                try:
                    importlib.import_module(value[0])
                except ImportError as err:
                    raise ValueError(f"model_index.json names {value[0]!r}, which this version lacks") from err


class AutoSRPipeline:
    """Factory: ``AutoSRPipeline.from_pretrained(dir)`` returns the right sr_diffusion pipeline."""

    def __init__(self, *args, **kwargs):
        raise OSError("AutoSRPipeline is a factory: use AutoSRPipeline.from_pretrained(directory)")

    @classmethod
    def pipeline_class(cls, pretrained_model_name_or_path: str | os.PathLike):
        """The pipeline class a saved folder was written by (looked up in :mod:`sr_diffusion.registry`)."""
        folder = Path(pretrained_model_name_or_path)
        index = folder / "model_index.json"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a directory (expected a saved pipeline folder)")
        if not index.is_file():
            raise FileNotFoundError(f"{folder}: no model_index.json; this is not a saved pipeline folder")
        try:
            model_index = json.loads(index.read_text())
            class_name = model_index["_class_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: corrupt model_index.json ({err})") from err
        if class_name not in PIPELINE_CLASSES:
            raise ValueError(
                f"{folder}: pipeline class {class_name!r} is not an sr_diffusion pipeline; "
                f"known: {', '.join(sorted(PIPELINE_CLASSES))}"
            )
        _import_own_component_modules(model_index)
        return PIPELINE_CLASSES[class_name]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a pipeline folder saved with ``save_pretrained``; keyword arguments go to its class."""
        pipeline_class = cls.pipeline_class(pretrained_model_name_or_path)
        return pipeline_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
