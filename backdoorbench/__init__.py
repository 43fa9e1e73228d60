"""backdoorbench: attack models with backdoors and compare defenses, for text and vision alike."""

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

#: the public API (backdoorbench.api), imported on first use so that ``import backdoorbench`` stays cheap
_API = (
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


def __getattr__(name: str):  # PEP 562: lazy public API
    if name in _API:
        from backdoorbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'backdoorbench' has no attribute {name!r}")


__all__ = [
    *_API,
    "REGISTRY",
    "DetectorLoadError",
    "Guard",
    "ModelMismatchError",
    "load_detector",
    "__version__",
    "register_attack",
    "register_dataset",
    "register_defense",
    "register_model",
]

# public entry points imported on first use, so that `import backdoorbench` stays cheap
_LAZY = {
    "load_detector": "backdoorbench.defenses.persist",
    "DetectorLoadError": "backdoorbench.defenses.persist",
    "ModelMismatchError": "backdoorbench.defenses.persist",
    "Guard": "backdoorbench.defenses.guard",
}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'backdoorbench' has no attribute {name!r}")
