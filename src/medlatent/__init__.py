"""medlatent: the MedVAE family of medical-image autoencoders (Varma et al., MIDL 2025)."""

from medlatent import checkpoints as _checkpoints
from medlatent._version import __version__
from medlatent.model import DiagonalGaussian, MedVAE, MedVAEConfig
from medlatent.model.autoencoder import set_weight_files
from medlatent.registry import ModelInfo, get_model_info, list_models

# The model layer imports nothing above it; MedVAE.from_pretrained / save_pretrained read and write weight files
# through the checkpoints layer, installed here, which every import of a medlatent module runs first.
set_weight_files(_checkpoints)

__all__ = ["DiagonalGaussian", "MedVAE", "MedVAEConfig", "ModelInfo", "__version__", "get_model_info", "list_models"]
