"""Where objects and settings come from: manifest files (``manifests``), the
KubeProxyConfiguration file and the host (``config``), and the Kubernetes API (``api``: the
controller's store, list/watch informers, a one-shot list for dry runs)."""
