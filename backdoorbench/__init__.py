"""backdoorbench: attack models with backdoors and compare defenses, for text and vision alike.

The public API (``import backdoorbench as bb``; see docs/api.md) is imported on first use, so that
``import backdoorbench`` stays cheap.
"""

from backdoorbench._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"

from backdoorbench.registry import (  # noqa: E402
    REGISTRY,
    register_attack,
    register_dataset,
    register_defense,
    register_model,
)

_API = "backdoorbench.api"
_PERSIST = "backdoorbench.defenses.persist"
#: public name → the module that defines it (imported on first access, PEP 562)
_LAZY = {
    **{
        name: _API
        for name in (
            "RunResult",
            "compose",
            "create_attack",
            "create_dataset",
            "create_defense",
            "create_model",
            "list_attacks",
            "list_datasets",
            "list_defenses",
            "list_models",
            "run",
            "wrap_hf",
            "wrap_image_model",
        )
    },
    "Samples": "backdoorbench.data.base",
    "load_detector": _PERSIST,
    "DetectorLoadError": _PERSIST,
    "ModelMismatchError": _PERSIST,
    "Guard": "backdoorbench.defenses.guard",
}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'backdoorbench' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "REGISTRY",
    "__version__",
    "register_attack",
    "register_dataset",
    "register_defense",
    "register_model",
]
