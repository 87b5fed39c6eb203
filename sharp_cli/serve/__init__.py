"""`sharp serve`: one loaded model behind an OpenAI-compatible HTTP API (docs/serve.md)."""
