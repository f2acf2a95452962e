"""The code that talks to the kernel: loading rules (``apply``) and deleting stale conntrack
entries (``conntrack``)."""
