"""Simulated Consul and Nomad cluster speaking the real HTTP APIs on loopback."""
