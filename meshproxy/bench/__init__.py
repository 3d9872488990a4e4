"""`meshproxy bench`: the installed benchmark harness (upstream, proxies, load, same-run table)."""
