"""The boundary to the node: running processes (``run``: one PATH rule, a timeout on every
call), the writer lock (``lock``), reading what the kernel holds (``kernel``: nftables as JSON
through libnftables, iptables-save through one reader), loading rules (``apply``) and deleting
stale conntrack entries (``conntrack``)."""
