"""Label tables shared by the data and the networks (the lowest layer: imports nothing of the project)."""
