"""``kpgen lab``: the seed article's cluster in network namespaces on one machine."""
