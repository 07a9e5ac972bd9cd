"""Runtimes an artifact is verified in besides the Python ones: the browser's (browser.py)."""
