"""Tests of the source tree itself: they need the checkout (CI's first pass), not an install."""
