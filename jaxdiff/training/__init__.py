"""Training pieces: losses, train state, jitted step, Orbax checkpoints."""
