"""The bound engine: one graph, per-operator rules, IBP / CROWN-IBP / CROWN.

>>> from certkit.bounds import compute_bounds, margin_matrix
>>> lb, ub = compute_bounds(model, x - eps, x + eps, method="crown", C=margin_matrix(y, 10))
"""

from certkit.bounds.engine import METHODS, BoundedModel, compute_bounds, no_tf32
from certkit.bounds.graph import Graph, Node, build_graph
from certkit.bounds.spec import margin_matrix

__all__ = ["METHODS", "BoundedModel", "Graph", "Node", "build_graph", "compute_bounds", "margin_matrix", "no_tf32"]
