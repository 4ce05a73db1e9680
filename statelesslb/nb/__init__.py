"""The NB side: what a marked load balancer means, validated; its stored ids."""
