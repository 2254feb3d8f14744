"""Published results: the Hub-dataset registry."""
