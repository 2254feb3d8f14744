"""The provider check: OpenAI-compatible endpoints against local candidates."""
