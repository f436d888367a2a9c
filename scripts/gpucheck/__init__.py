"""The parts of scripts/gpu_check.py, one job per module; the script keeps the command line, the list of
parts, the dry run and the loop that runs the parts and writes the report."""
