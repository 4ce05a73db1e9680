"""statelesslb-ctl."""
