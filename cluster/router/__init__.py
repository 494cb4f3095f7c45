"""The HTTP router: OpenAI-compatible API, instance choice, token streams (see app.py)."""
