"""Reading and writing medical images with their geometry."""
