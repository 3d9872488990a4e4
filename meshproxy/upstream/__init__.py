"""Upstream side: clusters, endpoints, load balancing and connection pools."""
