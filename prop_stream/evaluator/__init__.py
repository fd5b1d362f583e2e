"""The streaming evaluator: tick sources, the loop, the in-memory latest metrics."""

from prop_stream.evaluator.demo import DemoConfig, DemoSource
from prop_stream.evaluator.group import GroupEvaluatorLoop
from prop_stream.evaluator.loop import EvaluatorLoop, LoopStats
from prop_stream.evaluator.metrics import LatestMetrics
from prop_stream.evaluator.service import build_group_loop, build_loop, build_source
from prop_stream.evaluator.sources import NoneSource, TickSource

__all__ = [
    "DemoConfig",
    "DemoSource",
    "EvaluatorLoop",
    "GroupEvaluatorLoop",
    "LatestMetrics",
    "LoopStats",
    "NoneSource",
    "TickSource",
    "build_group_loop",
    "build_loop",
    "build_source",
]
