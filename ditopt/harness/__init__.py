"""The harness around the compiler: model zoo, trained fixture, bench, metrics and the CLI.

Nothing here is needed to compile a model; the compiler core (ditopt/) and the methods
(ditopt.passes) never import it.
"""
