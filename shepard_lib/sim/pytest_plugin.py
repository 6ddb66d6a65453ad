"""pytest fixtures for the simulated cluster (written by the Nomad-sim work)."""
