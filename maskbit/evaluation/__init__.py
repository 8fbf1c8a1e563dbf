"""Image-quality evaluation (FID, KID, IS, precision/recall) for MaskBit samples."""
