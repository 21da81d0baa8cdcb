"""medlatent: the MedVAE family of medical-image autoencoders (Varma et al., MIDL 2025)."""

__version__ = "0.1.0"

from medlatent.model import DiagonalGaussian, MedVAE, MedVAEConfig  # noqa: E402
from medlatent.registry import ModelInfo, get_model_info, list_models  # noqa: E402

__all__ = ["DiagonalGaussian", "MedVAE", "MedVAEConfig", "ModelInfo", "__version__", "get_model_info", "list_models"]
