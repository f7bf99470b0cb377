"""The core every command shares: config, models, machine probe, errors, console, tiny model."""
