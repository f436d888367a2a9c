"""The parts of scripts/benchmark.py, one concern per module; the script keeps the command line, the
resolution of its settings and the steps of the model mode."""
