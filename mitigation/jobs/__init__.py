"""The jobs below the command line: typed options in, typed results out, no argument parsing and no printing.

``train`` (the attack lab's model), ``detect``, ``mitigate`` (detect + twins + bundle), ``evaluate``, and
``demo``, which composes the others. docs/cli.md says what each writes.
"""
from bna_gateway.mitigation.jobs.demo import DemoOptions, DemoOutcome, demo
from bna_gateway.mitigation.jobs.detect import DetectOptions, DetectOutcome, detect
from bna_gateway.mitigation.jobs.evaluate import EvaluateOptions, evaluate
from bna_gateway.mitigation.jobs.mitigate import MitigateOptions, MitigateOutcome, mitigate
from bna_gateway.mitigation.jobs.options import RunOptions
from bna_gateway.mitigation.jobs.train import TrainOptions, TrainResult, train

__all__ = ["DemoOptions", "DemoOutcome", "DetectOptions", "DetectOutcome", "EvaluateOptions", "MitigateOptions",
           "MitigateOutcome", "RunOptions", "TrainOptions", "TrainResult", "demo", "detect", "evaluate", "mitigate",
           "train"]
