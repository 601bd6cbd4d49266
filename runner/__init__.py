"""The runner daemon: runs commands, spools their events, sends them to a broker."""
