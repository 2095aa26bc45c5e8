# -*- test-case-name: tests.e2e.test_cli -*-
"""bioproxy: a KV-cache-warming reverse proxy for llama.cpp's llama-server."""

__version__ = "0.1.0"
