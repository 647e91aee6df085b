"""What drives a model to make vectors: the recipes, contrast pairs files, and the capture driver inside vLLM."""
