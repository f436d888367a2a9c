"""The parts of scripts/fault_campaign.py, one job per module; the script keeps the command line and the
summary it prints."""
