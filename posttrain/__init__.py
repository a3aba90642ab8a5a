"""posttrain: distributed post-training of SSL speech deepfake detectors."""

__version__ = "0.1.0"
