"""Entry points: runnable as `python launch/<stage>.py`, `python -m launch.<stage>` or `tensorpoly-ds <stage>`."""
