"""Local MMLU subject configs and their dataset loader."""
