"""Training MedVAE models: configuration, initialisation from natural-image VAEs, losses, loop and export."""
