"""Workload identity (SPIFFE), certificates, TLS contexts, the mesh CA, authorization."""
