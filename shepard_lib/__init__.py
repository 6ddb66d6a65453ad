"""Shepard: safe, rate-limited restarts of HashiCorp Nomad tasks.

``shepard_lib`` is a plain library: planning, locking, restarting, garbage collection and log
shipping, with no dependency on Ansible. The Ansible collection, the ``shepard`` command and ops
scripts are thin layers over it.
"""

__version__ = "0.1.0"
