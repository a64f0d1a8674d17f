"""Gradient-flow engine: fields in the tau and polar clocks, diffrax integration, solutions."""

from ._engine import gradient_flow as gradient_flow
from ._engine import gradient_flow_batch as gradient_flow_batch
from ._limit_solve import LimitFlowSolution as LimitFlowSolution
from ._limit_solve import limit_flow as limit_flow
from ._solution import FlowSolution as FlowSolution
from ._solution import FlowStatus as FlowStatus
