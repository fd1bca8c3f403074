"""The engine: work items (:mod:`.work`), the pure planner (:mod:`.planner`) and the loop that
runs it against the model (:mod:`.loop`)."""

from .loop import Engine
from .planner import MAX_STREAM_CHUNK, Delivery, Plan, Planner
from .work import Delta, Generation, StepWork, StopStrings

__all__ = [
    "MAX_STREAM_CHUNK",
    "Delivery",
    "Delta",
    "Engine",
    "Generation",
    "Plan",
    "Planner",
    "StepWork",
    "StopStrings",
]
