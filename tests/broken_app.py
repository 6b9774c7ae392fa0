"""An app whose import fails: every worker crashes at once."""

raise RuntimeError("this app is broken on purpose (tests/broken_app.py)")
