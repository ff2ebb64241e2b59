"""Tools and demos built on the trainer: the shapes generators, demos, CapFilt, the config reference."""
