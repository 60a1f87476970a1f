"""Backdoor detection: batched trigger reverse-engineering for every ordered class pair + MAD."""
from bna_gateway.mitigation.detection.detect import DetectionConfig, DetectionResult, detect_backdoor

__all__ = ["DetectionConfig", "DetectionResult", "detect_backdoor"]
