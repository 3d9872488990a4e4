"""Sans-IO HTTP codecs: bytes in, events out; events in, bytes out. No sockets, clocks or routes."""
