"""statelesslb: stateless MAC-mode load balancing on OVN gateways."""

__version__ = "0.1.0"
