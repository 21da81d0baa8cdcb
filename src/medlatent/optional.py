"""Optional packages: imported only where needed, with one clear error when missing or broken.

A package can be installed yet fail to import: PyPI's ``torchvision`` beside a CPU build of ``torch`` raises
``RuntimeError: operator torchvision::nms does not exist``. Such a failure must name the package, the feature that
needed it and the way out, and must never reach the core commands, which import none of these packages.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The extra holding the pretrained networks that come through torchvision (LPIPS VGG16, BiomedCLIP, HRNet).
PRETRAINED_EXTRA = "pip install 'medlatent[pretrained]' with a matching torch/torchvision pair"


class OptionalDependencyError(ImportError):
    """An optional package is missing or fails to import; the message says which feature needs it and what to do."""


def import_optional(name: str, purpose: str, install: str) -> ModuleType:
    """Import ``name`` for ``purpose``, or raise :class:`OptionalDependencyError` saying how to get it.

    Args:
        name: the module to import, e.g. ``"timm"``.
        purpose: what needs it, e.g. ``"the hrnet_w64 classifier"``.
        install: how to install it, e.g. ``"pip install 'medlatent[eval]'"``.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        top = name.split(".")[0]
        if e.name and e.name.split(".")[0] != top:  # the package is there, one of its own dependencies is not
            raise OptionalDependencyError(
                f"{purpose} needs {name}, which is installed but cannot import its dependency {e.name}: {install}"
            ) from e
        raise OptionalDependencyError(f"{purpose} needs {name}, which is not installed: {install}") from e
    except Exception as e:  # installed but broken, typically a torchvision built for another torch
        import torch

        raise OptionalDependencyError(
            f"{purpose} needs {name}, which is installed but fails to import: {type(e).__name__}: {e}. "
            f"This usually means torchvision does not match torch {torch.__version__}; install a matching pair "
            "(e.g. pip install torch==2.14.1 torchvision==0.29.1), or uninstall torchvision to use the features "
            "that do not need it."
        ) from e
