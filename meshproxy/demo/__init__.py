"""`meshproxy demo`: two backends, the proxy and some traffic, all on loopback."""
