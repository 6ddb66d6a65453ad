# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The Consul and Nomad connection options every Shepard module shares."""

from __future__ import annotations


class ModuleDocFragment:
    """Connection options; see plugins/module_utils/shepard.py for the matching argument spec."""

    DOCUMENTATION = r"""
options:
  config_file:
    description:
      - A Shepard configuration file (YAML), the same file the agents read (O(consul_address) and the other
        options here win over it).
      - Use it for the settings that have no option here, such as C(key_prefix), C(lock_scope),
        C(session_ttl) or C(lock_delay).
      - If not set, the environment variable E(SHEPARD_CONFIG_PATH) is used; without either, the environment
        variables named below and Shepard's defaults apply.
    type: path
  consul_address:
    description:
      - Consul HTTP address, such as V(https://consul.example.com:8501). C(host:port) means http.
      - If not set, the environment variable E(CONSUL_HTTP_ADDR) is used, then V(http://127.0.0.1:8500).
    type: str
  consul_token:
    description:
      - Consul ACL token.
      - If not set, the environment variable E(CONSUL_HTTP_TOKEN) is used.
    type: str
  consul_ca_file:
    description:
      - CA certificate (PEM) to verify Consul's TLS certificate with.
      - If not set, the environment variable E(CONSUL_CACERT) is used.
    type: path
  consul_client_cert:
    description:
      - Client certificate (PEM) to present to Consul; needs O(consul_client_key).
      - If not set, the environment variable E(CONSUL_CLIENT_CERT) is used.
    type: path
  consul_client_key:
    description:
      - Key of O(consul_client_cert) (PEM).
      - If not set, the environment variable E(CONSUL_CLIENT_KEY) is used.
    type: path
  nomad_address:
    description:
      - Nomad HTTP address, such as V(https://nomad.example.com:4646). C(host:port) means http.
      - If not set, the environment variable E(NOMAD_ADDR) is used, then V(http://127.0.0.1:4646).
    type: str
  nomad_token:
    description:
      - Nomad ACL token.
      - If not set, the environment variable E(NOMAD_TOKEN) is used.
    type: str
  nomad_namespace:
    description:
      - Nomad namespace of the job.
      - If not set, the environment variable E(NOMAD_NAMESPACE) is used, then V(default).
    type: str
  nomad_region:
    description:
      - Nomad region to query.
      - If not set, the environment variable E(NOMAD_REGION) is used, then the agent's region.
    type: str
  nomad_ca_file:
    description:
      - CA certificate (PEM) to verify Nomad's TLS certificate with.
      - If not set, the environment variable E(NOMAD_CACERT) is used.
    type: path
  validate_certs:
    description:
      - Verify the TLS certificates of Consul and Nomad.
      - If not set, E(CONSUL_HTTP_SSL_VERIFY) (Consul) and E(NOMAD_SKIP_VERIFY) (Nomad, inverted) are used,
        then V(true).
    type: bool
notes:
  - Precedence, highest first, the same as the C(shepard) command's, C(--config) being O(config_file), is
    these options, then the configuration file, then the environment variables, then Shepard's defaults.
  - The environment variables are read where the module runs; set them with the C(environment) keyword.
  - All modules that take these options are in the action group C(shepard.nomad.shepard), so
    C(module_defaults) with C(group/shepard.nomad.shepard) sets them once for a play.
requirements:
  - Shepard (the C(shepard) Python package, which provides C(shepard_lib)) on the host the module runs on,
    with Python 3.11 or later.
"""
