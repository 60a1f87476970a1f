"""Backdoor detection: batched trigger reverse-engineering for every ordered class pair, MAD scoring, and
per-target refinements, each a named stage (``pipeline`` lists their order). docs/method.md#detection."""
from bna_gateway.mitigation.detection.config import DEFAULT_THRESHOLD, TRIGGER_TYPES, DetectionConfig, ReverseConfig
from bna_gateway.mitigation.detection.pipeline import detect_backdoor
from bna_gateway.mitigation.detection.records import DetectionResult, PairRecord, TargetTrigger

__all__ = ["DEFAULT_THRESHOLD", "DetectionConfig", "DetectionResult", "PairRecord", "ReverseConfig", "TRIGGER_TYPES",
           "TargetTrigger", "detect_backdoor"]
