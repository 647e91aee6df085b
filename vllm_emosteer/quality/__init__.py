"""Does steering show: the evaluation and its emotion scorers."""
