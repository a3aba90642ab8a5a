"""``posttrain serve``: an HTTP service around a detector (config, admission and batching, the app, its page)."""
