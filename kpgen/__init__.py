"""kpgen: a kube-proxy written in Python."""
