"""Traffic interception: the iptables rules that send a pod's traffic through the proxy."""
