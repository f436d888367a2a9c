"""The parts of scripts/benchmark_trainer.py, one job per module; the script keeps the command line, the
resolution of its settings and data, and the loop over the alternating runs."""
