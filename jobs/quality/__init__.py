"""Image quality signals (blur, exposure, contrast, information, colour, shape) into ``image_quality``."""
