"""The jinja2 templates that spell a plan out as nftables or iptables rules."""
