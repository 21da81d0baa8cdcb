"""Any-size inference: tile plans, blending, tiled encode/decode within a memory budget."""

from medlatent.engine.tiled import TiledAutoencoder, TileSettings

__all__ = ["TileSettings", "TiledAutoencoder"]
