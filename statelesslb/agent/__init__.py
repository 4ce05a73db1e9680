"""The daemon: watchers, the loop, the NB writer, the control socket."""
