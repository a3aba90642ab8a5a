"""Shared fixtures: a tiny real corpus (sine/noise FLAC + protocol CSV) and a DeepSpeed CPU env."""

from __future__ import annotations

import os

# DeepSpeed must pick its CPU accelerator before it is imported anywhere in the test session.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
