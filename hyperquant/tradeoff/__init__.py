"""Size / accuracy / latency tradeoff reports: Pareto frontiers and report rendering."""

from hyperquant.tradeoff.frontier import best_under_budget, metric, pareto_front
from hyperquant.tradeoff.render import write_report

__all__ = ["best_under_budget", "metric", "pareto_front", "write_report"]
