"""The data plane: listeners, downstream connections, HTTP streams and the TCP relay."""
