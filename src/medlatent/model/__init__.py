from medlatent.model.autoencoder import AutoencoderOutput, Decoder, Encoder, MedVAE
from medlatent.model.config import MedVAEConfig
from medlatent.model.posterior import DiagonalGaussian

__all__ = ["AutoencoderOutput", "Decoder", "DiagonalGaussian", "Encoder", "MedVAE", "MedVAEConfig"]
