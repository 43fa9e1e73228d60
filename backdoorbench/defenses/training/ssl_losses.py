"""The loss functions of DBD's self-supervised methods (:mod:`backdoorbench.defenses.training.ssl`), from a
*backend*: ``lightly`` (``lightly.loss``, the default) or ``solo`` (solo-learn's ``solo.losses.*_loss_func``, where
installed with ``pip install --no-deps solo-learn==1.0.2``; the adapter loads its plain-torch loss files without
solo-learn's own dependencies)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backdoorbench.config import ConfigError

SSL_METHODS = ("simclr", "byol", "barlow_twins", "vicreg")
SSL_BACKENDS = ("lightly", "solo")
SOLO_INSTALL = "pip install --no-deps solo-learn==1.0.2"
# solo-learn module and function of each method's loss
_SOLO_FUNCS = {
    "simclr": ("solo.losses.simclr", "simclr_loss_func"),
    "byol": ("solo.losses.byol", "byol_loss_func"),
    "barlow_twins": ("solo.losses.barlow", "barlow_loss_func"),
    "vicreg": ("solo.losses.vicreg", "vicreg_loss_func"),
}



# -- loss backends ---------------------------------------------------------------------------------------
def _solo_function(method: str) -> Callable[..., torch.Tensor]:
    module_name, func_name = _SOLO_FUNCS[method]
    try:
        module = _import_solo_losses(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"defense.ssl_backend=solo needs solo-learn's loss functions ({module_name}.{func_name}), which "
            f"cannot be imported ({exc}). Install them with `{SOLO_INSTALL}` (its declared dependencies pin "
            "torch 1.9, so install without them: only the plain-torch loss functions are used), or use "
            "defense.ssl_backend=lightly"
        ) from None
    func = getattr(module, func_name, None)
    if func is None:
        raise ConfigError(f"defense.ssl_backend=solo: {module_name} has no {func_name}; expected solo-learn 1.0.x")
    return func


def _import_solo_losses(module_name: str) -> Any:
    """Import a solo-learn loss module. ``solo/__init__`` imports solo-learn's whole method zoo, which
    needs pytorch-lightning 1.x and lightning-bolts; the loss modules themselves are plain torch. So when
    the package import fails, load the loss file on its own, without running the package's ``__init__``."""
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # not installed, or solo/__init__ failed on its own dependencies
        if "solo" in sys.modules and sys.modules["solo"] is None:  # import explicitly blocked
            raise ImportError(f"{module_name}: {exc}") from exc
        try:
            spec = importlib.util.find_spec("solo")
        except (ValueError, AttributeError):
            spec = None
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(roots[0], *module_name.split(".")[1:]).with_suffix(".py") if roots else None
        if path is None or not path.is_file():
            raise ImportError(f"{module_name}: {exc}") from exc
        file_spec = importlib.util.spec_from_file_location(f"backdoorbench._solo.{path.stem}", path)
        module = importlib.util.module_from_spec(file_spec)  # type: ignore[arg-type]
        file_spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module


def solo_available() -> bool:
    """Whether solo-learn's loss package can be found (without importing it)."""
    if "solo.losses" in sys.modules or "solo" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("solo") is not None
    except (ImportError, ValueError):
        return False


def pair_loss(
    method: str, backend: str, temperature: float = 0.5
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of ``method`` from ``backend`` as ``f(a, b) -> scalar``: for SimCLR, Barlow Twins and VICReg
    ``a, b`` are the two views' projections; for BYOL ``a`` is the online prediction and ``b`` the target
    projection of the other view."""
    if method not in SSL_METHODS:
        raise ConfigError(f"defense.ssl must be one of {SSL_METHODS}, got {method!r}")
    if backend == "lightly":
        from lightly import loss as lightly_loss

        if method == "simclr":
            return lightly_loss.NTXentLoss(temperature=temperature)
        if method == "byol":
            return lightly_loss.NegativeCosineSimilarity()
        if method == "barlow_twins":
            return lightly_loss.BarlowTwinsLoss()
        return lightly_loss.VICRegLoss()
    if backend == "solo":
        func = _solo_function(method)
        if method == "simclr":
            params = list(inspect.signature(func).parameters)
            if params[:2] == ["z1", "z2"]:  # solo-learn 1.0.0-1.0.3
                return lambda z1, z2: func(z1, z2, temperature=temperature)

            def simclr_indexed(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:  # later: (z, indexes)
                idx = torch.arange(z1.shape[0], device=z1.device).repeat(2)
                return func(torch.cat([z1, z2]), idx, temperature=temperature)

            return simclr_indexed
        return lambda a, b: func(a, b)
    raise ConfigError(f"defense.ssl_backend must be one of {SSL_BACKENDS}, got {backend!r}")
