"""Observability as a side channel: the proxy emits records, this package turns them into output."""
