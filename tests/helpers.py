"""The test helpers live in the library (``graphopt.testing``, shipped for plugin authors);
this module re-exports them for the project's own tests."""

from __future__ import annotations

from graphopt.testing import (  # noqa: F401
    assert_exact, assert_graph_equal, assert_idempotent, count_calls, count_modules, graph_structure, outputs,
    randomize_state, run_pass, train_steps, write_model_file,
)

__all__ = ["assert_exact", "assert_graph_equal", "assert_idempotent", "count_calls", "count_modules",
           "graph_structure", "outputs", "randomize_state", "run_pass", "train_steps", "write_model_file"]
